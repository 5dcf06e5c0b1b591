"""Makes ``import torch`` fail in this interpreter: put this folder on PYTHONPATH to run code as
on a machine where torch is not installed (parity verify must work there); see
parity.golden.hide_torch."""
from parity.golden import hide_torch

hide_torch()
