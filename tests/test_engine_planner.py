"""The cadence planner's decisions, driven by a scripted machine and scripted stage costs (no event
loop, no timing): what it restores, how it shares, how it reacts to lateness and to other programs,
and the capacity it announces."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kfgan_daemon.engine import EngineSettings
from kfgan_daemon.engine.machine import LoadSample, MachineLoad, usable_cores
from kfgan_daemon.engine.planner import ADMISSION_MARGIN, RATE_FLOOR, CadencePlanner, StreamPlan, _water_fill

HD = 1280 * 720


@dataclass
class ScriptedMachine:
    """A machine whose clock, process CPU time and other programs' load the test sets."""

    cores: float = 2.0
    now: float = 0.0
    process_cpu: float = 0.0
    others: float = 0.0  # cores other programs keep busy
    busy: float = 0.0  # machine busy seconds (this process and others)
    total: float = 0.0

    def load(self) -> MachineLoad:
        return MachineLoad(
            self.cores, self.read_busy, lambda: self.process_cpu, lambda: self.now, machine_cores=int(self.cores)
        )

    def read_busy(self) -> tuple[float, float]:
        return self.busy, self.total

    def run(self, seconds: float, process_cpu: float) -> None:
        self.now += seconds
        self.process_cpu += process_cpu
        self.busy += process_cpu + self.others * seconds
        self.total += self.cores * seconds


@dataclass
class Costs:
    """CPU seconds of one stream's work on the scripted machine."""

    base: float = 0.019  # every frame: decode, encode, carry
    prepare: float = 0.008
    complete: float = 0.008
    generator: float = 0.021  # per crop, one thread


@dataclass
class Simulation:
    streams: dict[str, float]  # id -> frames per second
    costs: Costs = field(default_factory=Costs)
    machine: ScriptedMachine = field(default_factory=ScriptedMachine)
    settings: EngineSettings = field(default_factory=EngineSettings)
    late_every: int = 0  # every n-th chosen frame misses its deadline (0: none)

    def __post_init__(self) -> None:
        self.planner = CadencePlanner(self.settings, self.machine.load(), clock=lambda: self.machine.now)
        self.planner.set_generator_prior(self.costs.generator)
        for stream_id in self.streams:
            self.planner.add_stream(stream_id)
        self.turns: dict[str, list[bool]] = {stream_id: [] for stream_id in self.streams}
        self._chosen = 0

    def run(self, seconds: float, tick: float = 0.01) -> None:
        """Frames arrive at each stream's rate; chosen ones cost a restoration, the others a carry."""
        next_frame = {stream_id: self.machine.now for stream_id in self.streams}
        end = self.machine.now + seconds
        while self.machine.now < end:
            cpu = 0.0
            for stream_id, fps in self.streams.items():
                if self.machine.now + 1e-9 < next_frame[stream_id]:
                    continue
                next_frame[stream_id] += 1.0 / fps
                self.planner.arrived(stream_id, self.machine.now, HD)
                turn = self.planner.take_turn(stream_id)
                self.turns[stream_id].append(turn)
                cpu += self.costs.base
                if turn:
                    self._restore(stream_id)
                    cpu += self.costs.prepare + self.costs.complete + self.costs.generator
            self.machine.run(tick, cpu)

    def _restore(self, stream_id: str) -> None:
        self._chosen += 1
        self.planner.observe_stage(stream_id, "prepare", self.costs.prepare)
        self.planner.observe_stage(stream_id, "complete", self.costs.complete)
        self.planner.observe_batch(1, self.costs.generator, self.costs.generator)
        if self.late_every and self._chosen % self.late_every == 0:
            self.planner.late(stream_id)

    def restored_share(self, stream_id: str, last: int = 50) -> float:
        turns = self.turns[stream_id][-last:]
        return sum(turns) / len(turns)


def test_water_filling_shares_fairly_and_gives_what_one_cannot_use_to_the_others() -> None:
    assert _water_fill([25.0, 25.0], 20.0) == pytest.approx([0.4, 0.4])
    # a 10 FPS stream needs only 10 of its 20: the rest goes to the 30 FPS one
    assert _water_fill([10.0, 30.0], 30.0) == pytest.approx([1.0, 2 / 3])
    assert _water_fill([25.0, 30.0], 100.0) == [1.0, 1.0]


def _plan_with_share(share: float) -> tuple[Simulation, StreamPlan]:
    """A stream "a" whose share is set by hand, with no turn in hand."""
    simulation = Simulation({"a": 25.0})
    plan = simulation.planner._streams["a"]
    plan.share, plan.credit = share, 0.0
    return simulation, plan


def test_a_share_becomes_an_evenly_spaced_subset_of_frames() -> None:
    _, plan = _plan_with_share(0.4)
    turns = [plan.take_turn() for _ in range(50)]
    assert sum(turns) == 20
    chosen = [i for i, turn in enumerate(turns) if turn]
    gaps = {b - a for a, b in zip(chosen, chosen[1:])}
    assert gaps <= {2, 3}  # never a burst, never a long hole


def test_one_fast_stream_on_an_idle_machine_restores_every_frame() -> None:
    simulation = Simulation({"a": 25.0}, Costs(base=0.005, prepare=0.004, complete=0.004, generator=0.01))
    simulation.run(3.0)
    assert simulation.restored_share("a") == 1.0
    assert simulation.planner.stream_info("a").limited_by == "none"


def test_two_720p_streams_on_two_cores_get_equal_regular_cadences_from_the_measured_costs() -> None:
    simulation = Simulation({"a": 25.0, "b": 25.0})
    simulation.run(5.0)
    # (2 cores x 0.85 - 50 frames/s x 19 ms) / (8 + 8 + 21 ms per restoration) = 20 crops/s, 10 each
    expected = (2 * 0.85 - 50 * 0.019) / 0.037 / 50
    for stream_id in ("a", "b"):
        assert simulation.restored_share(stream_id) == pytest.approx(expected, abs=0.05)
        assert simulation.planner.stream_info(stream_id).limited_by == "cpu"
    info = simulation.planner.stream_info("a")
    assert info.cadence == pytest.approx(1 / info.restored_share)
    # the planned CPU fits the machine: every frame's base cost plus the restorations
    restored = sum(sum(turns[-50:]) for turns in simulation.turns.values()) / 2  # per second
    assert 50 * 0.019 + restored * 0.037 <= 2 * 0.85 + 0.05


def test_other_programs_on_the_machine_lower_the_cadence_and_say_why() -> None:
    alone = Simulation({"a": 25.0, "b": 25.0})
    alone.run(4.0)
    shared = Simulation({"a": 25.0, "b": 25.0}, machine=ScriptedMachine(others=0.5))
    shared.run(4.0)
    assert shared.restored_share("a") < alone.restored_share("a") - 0.1
    assert shared.planner.stream_info("a").limited_by == "shared_cpu"
    assert shared.planner.capacity() < alone.planner.capacity()


def test_a_slow_generator_limits_the_rate_whatever_the_cores() -> None:
    simulation = Simulation({"a": 25.0}, Costs(base=0.001, prepare=0.001, complete=0.001, generator=0.08))
    simulation.machine.cores = 16.0
    simulation.run(3.0)
    assert simulation.restored_share("a") == pytest.approx(0.9 / 0.08 / 25, abs=0.05)
    assert simulation.planner.stream_info("a").limited_by == "generator"


def test_late_restorations_cut_the_rate_and_clean_periods_let_it_grow_back() -> None:
    simulation = Simulation({"a": 25.0, "b": 25.0}, late_every=3)
    simulation.run(3.0)
    assert simulation.planner.trim < 0.5
    assert simulation.planner.stream_info("a").limited_by == "deadline"
    cut = simulation.restored_share("a")
    simulation.late_every = 0
    simulation.run(6.0)
    assert simulation.planner.trim == pytest.approx(1.0, abs=0.3)
    assert simulation.restored_share("a") > cut


def test_an_overloaded_machine_still_restores_some_frames_of_every_stream() -> None:
    simulation = Simulation({f"s{i}": 30.0 for i in range(6)}, Costs(base=0.05))  # 6 x 30 x 50 ms: 9 cores
    simulation.run(4.0)
    for stream_id in simulation.streams:
        assert sum(simulation.turns[stream_id][-30:]) >= RATE_FLOOR  # at least one a second


def test_a_refused_turn_passes_to_the_next_frame() -> None:
    simulation, plan = _plan_with_share(0.25)
    turns = [plan.take_turn() for _ in range(4)]
    assert turns == [False, False, False, True]
    simulation.planner.give_back("a")
    assert plan.take_turn()  # the next frame tries again instead of waiting a whole cadence


def test_capacity_follows_the_measured_costs_and_counts_what_is_open() -> None:
    settings = EngineSettings(min_restored_share=0.2, capacity_reference=(1280, 720, 25.0))
    simulation = Simulation({}, settings=settings)
    # the prior for a 720p25 stream: base 1.0 x 21 ms per megapixel, restoration 1.7 x 21 ms
    base, extra = 0.021 * HD / 1e6, 0.021 * 1.7
    assert simulation.planner.capacity() == int(ADMISSION_MARGIN * 2 * 0.85 / (25 * (base + 0.2 * extra)))
    simulation = Simulation({"a": 25.0, "b": 25.0}, settings=settings)
    simulation.run(4.0)
    measured = simulation.planner.capacity()
    assert measured == int(ADMISSION_MARGIN * 2 * 0.85 / (25 * (0.019 + 0.2 * 0.037)))
    assert simulation.planner.capacity_in_use() == pytest.approx(2 / measured)
    slow = Simulation({"a": 25.0, "b": 25.0}, Costs(base=0.04), settings=settings)
    slow.run(4.0)
    assert 1 <= slow.planner.capacity() < measured


def test_the_machine_load_tells_other_programs_from_this_process() -> None:
    machine = ScriptedMachine(cores=2.0, others=0.7)
    load = machine.load()
    machine.run(1.0, process_cpu=0.9)
    sample = load.sample()
    assert isinstance(sample, LoadSample)
    assert sample.process == pytest.approx(0.9)
    assert sample.others == pytest.approx(0.7)
    # on a 16-CPU machine of which we may use 2, other programs' load is taken as spread over all 16
    wide = MachineLoad(2.0, machine.read_busy, lambda: machine.process_cpu, lambda: machine.now, machine_cores=16)
    machine.total += 14.0  # the 14 CPUs this process may not use, idle for the second
    machine.run(1.0, process_cpu=0.9)
    machine.total += 14.0
    wide_sample = wide.sample()
    assert wide_sample is not None and wide_sample.others < 0.7


def test_usable_cores_honours_a_cgroup_quota(tmp_path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert usable_cores(cpu_max) == pytest.approx(min(1.5, usable_cores(tmp_path / "missing")))
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == usable_cores(tmp_path / "missing")


def test_callers_who_come_at_once_are_admitted_one_by_one_as_each_is_measured() -> None:
    settings = EngineSettings(capacity_reference=(640, 480, 30.0))
    simulation = Simulation({}, Costs(base=0.005), settings=settings)
    assert simulation.planner.capacity() >= 3  # the priors: room for several
    simulation.streams["a"] = 30.0
    simulation.planner.add_stream("a")
    simulation.turns["a"] = []
    # a second caller a moment later waits (503, Retry-After) until the first one's cost is measured
    assert simulation.planner.capacity() == 1
    simulation.run(2.0)
    assert simulation.planner.capacity() >= 2


def test_other_programs_lower_the_capacity_announced_before_any_call() -> None:
    machine = ScriptedMachine()
    simulation = Simulation({}, machine=machine)
    idle = simulation.planner.capacity()
    machine.others = 1.0  # a browser takes a core
    machine.run(1.0, process_cpu=0.0)
    simulation.planner.capacity()  # samples the machine while no stream runs
    machine.run(1.0, process_cpu=0.0)
    assert simulation.planner.capacity() < idle
