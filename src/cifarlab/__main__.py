from cifarlab.cli import main

main()
