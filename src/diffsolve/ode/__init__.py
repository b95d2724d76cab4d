"""The ODE core: noise schedules, the model wrapper, step grids, the solver contract and the
one sampling loop. Imports nothing else from diffsolve but :mod:`diffsolve.numerics`."""
