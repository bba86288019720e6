if __name__ == "__main__":
    from hone.cli import main

    main()
