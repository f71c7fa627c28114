"""One module per executable; each exposes main(argv=None) -> exit status."""
