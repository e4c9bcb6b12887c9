from mmdiff.cli import main

main()
