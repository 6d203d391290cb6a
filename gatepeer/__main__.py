from gatepeer.cli import main

main()
