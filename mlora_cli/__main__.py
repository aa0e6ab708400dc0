from mlora_cli.cli import main

main()
