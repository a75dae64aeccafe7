"""python -m lstream.cli: the lstream command."""
from .main import main

main()
