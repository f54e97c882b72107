from rotator.cli import main

main()
