import sys

from .cli import leave, main

if __name__ == "__main__":  # not when a spawned worker process imports this module as its __mp_main__
    main(sys.argv[1:])
    leave()
