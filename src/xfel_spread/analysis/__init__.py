"""Analysis of the merged data: scoring against the simulation's truth and the resolution annulus."""
