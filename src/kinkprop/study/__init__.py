"""Studies: census protocols, experiment grids, results store and reports."""
