from tailpy.daemon.main import main

main()
