from edgemoe.cli.main import main

main()
