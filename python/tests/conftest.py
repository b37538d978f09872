import os
import sys

# mods.py and reference.py beside the tests
sys.path.insert(0, os.path.dirname(__file__))
