import numpy as np
import zarr

root = zarr.open_group("my_store", mode="r")  # a local path, or "s3://bucket/prefix" with s3fs installed
meta = root.attrs["maria"]  # both backbones, d_mlm, d_ar, vocab_size, feature_dtype, masking, ...
for name, block in sorted(root["blocks"].groups()):  # only committed blocks have a group
    data = block[block.attrs["maria_commit"]["attempt"]]  # the committed attempt; never read another one
    features = data["features"][:]  # (rows, d_mlm + d_ar) = [h_mlm ; h_ar]
    if meta["feature_dtype"] == "bfloat16":  # stored as bfloat16 bit patterns in uint16
        features = (features.astype(np.uint32) << 16).view(np.float32)
    elif meta["feature_dtype"] == "float8":  # e4m3fn codes in uint8, each row times its own scale
        c = np.arange(256)
        e = (c >> 3) & 15
        m = c & 7  # noqa: E702 -- the 256 e4m3fn values, from the bit layout
        e4m3fn = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)) * np.where(c & 128, -1, 1)
        features = (e4m3fn[features] * data["feature_scales"][:][:, None]).astype(np.float32)
    h_mlm, h_ar = features[:, : meta["d_mlm"]], features[:, meta["d_mlm"] :]
    targets = data["targets"][:]  # the masked tokens, as AR token ids
    print(name, h_mlm.shape, h_ar.shape, targets[:3])
