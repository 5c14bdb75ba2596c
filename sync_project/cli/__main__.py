from sync_project.cli import main

main()
