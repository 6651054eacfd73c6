from rilla_bridge.cli import main

main()
