from kfgan_daemon.cli import main

main()
