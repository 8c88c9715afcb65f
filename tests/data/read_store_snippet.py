import numpy as np
import zarr

root = zarr.open_group("my_store", mode="r")  # a local path, or "s3://bucket/prefix" with s3fs installed
meta = root.attrs["maria"]  # both backbones, d_mlm, d_ar, vocab_size, feature_dtype, masking, ...
for name, block in sorted(root["blocks"].groups()):  # only committed blocks have a group
    data = block[block.attrs["maria_commit"]["attempt"]]  # the committed attempt; never read another one
    features = data["features"][:]  # (rows, d_mlm + d_ar) = [h_mlm ; h_ar]
    if meta["feature_dtype"] == "bfloat16":  # stored as bfloat16 bit patterns in uint16
        features = (features.astype(np.uint32) << 16).view(np.float32)
    h_mlm, h_ar = features[:, :meta["d_mlm"]], features[:, meta["d_mlm"]:]
    targets = data["targets"][:]  # the masked tokens, as AR token ids
    print(name, h_mlm.shape, h_ar.shape, targets[:3])
