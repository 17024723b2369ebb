"""gin configs (a package so that gin resolves includes through the Python path)."""
