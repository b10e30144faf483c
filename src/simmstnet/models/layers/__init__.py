"""Building blocks shared by the models: embeddings, full/ProbSparse attention, Informer encoder
and decoder, spatial branch and cross-task interaction."""
