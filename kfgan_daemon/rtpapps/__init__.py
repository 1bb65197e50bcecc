"""Applications of :mod:`kfgan_daemon.media.rtp` around the streaming engine.

- :mod:`~kfgan_daemon.rtpapps.pipe`: ``kfgan-daemon pipe``, H.264 RTP in, restored RTP or y4m out.
- :mod:`~kfgan_daemon.rtpapps.clipsender`: a clip played as a live H.264 RTP camera.
- :mod:`~kfgan_daemon.rtpapps.livebench`: ``kfgan-daemon bench --live``, the clip sender through the pipe.
"""
