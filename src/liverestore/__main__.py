from liverestore.cli import main

main()
