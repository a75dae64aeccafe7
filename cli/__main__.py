"""python -m lstream.cli"""
from .main import main

main()
