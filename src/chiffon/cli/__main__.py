from chiffon.cli.main import main

main()
