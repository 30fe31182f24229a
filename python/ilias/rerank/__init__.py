"""Re-ranking a global shortlist with local descriptors.

- `locals_store`: the local-descriptor store (fixed N tokens per image, float16 or packed bits);
- `locals_hdf5`: the AMES HDF5 layout (`features` float32 [n, N, 5 + D]) in and out;
- `binary`: the ITQ projection, sign and bit packing of the binary variant;
- `ames`: the AMES model in torch (needs the `rerank` extra);
- `fuse`: global and local scores fused over the top M of each list.

The modules are imported on use, so that the numpy-only parts need no torch.
"""
