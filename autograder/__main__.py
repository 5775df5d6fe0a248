from autograder.cli import main

if __name__ == "__main__":      # Dask's local workers start by spawning: they import this module again
    raise SystemExit(main())
