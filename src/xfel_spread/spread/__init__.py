"""Stage 10, SPREAD: the energy dependence of each anomalous site's f', f'' refined across all shots."""
