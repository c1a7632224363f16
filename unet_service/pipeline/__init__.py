"""One pipeline for every image: sources planned into tiles, stitched into outputs;
cell instances from the stitched probabilities."""
