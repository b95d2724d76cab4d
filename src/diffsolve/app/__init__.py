"""The application: the command line, sampling at scale, the bench, and the demo models
(networks, data, loading). Nothing below this package imports it."""
