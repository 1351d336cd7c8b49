"""Expected-vs-measured results: published numbers (results/expected/*.yaml), run collection, comparison
tables (markdown + CSV) and plots. Entry points: `dyconv-compare`, `dyconv-reproduce`."""
