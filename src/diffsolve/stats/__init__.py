"""Statistics of a model or its data that solvers and wrappers use: DPM-Solver-v3's empirical
model statistics (:mod:`diffsolve.stats.ems`) and Gaussian data statistics with their exact
denoisers (:mod:`diffsolve.stats.gaussian`)."""
