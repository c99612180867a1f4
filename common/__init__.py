"""The lower layer: plumbing every package (pipeline, stages, trainer) may import, and that imports
none of them. Storage (local paths and fsspec URLs) lives here; so do the shared file formats."""
