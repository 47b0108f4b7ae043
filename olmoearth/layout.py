"""Tensor layout conventions, written once and used everywhere in this project.

Pixels (model input), one entry per modality name of `olmoearth.modalities.MODALITIES`:
    x[modality]: float32 (B, H, W, T, C)
        H, W on the 10 m grid; C = the modality's bands in registry order (bandsets concatenated);
        T = number of timesteps for temporal modalities (<= 12) and T = 1 for static maps.
        Raw sensor units before `NormStats.normalise`; NaN where a pixel is missing.
    months: int64 (B, T) month index 0..11 of each timestep (one T shared by all temporal modalities)

Tokens, one per (spatial patch, timestep, bandset), p = patch size:
    tokens[modality]: (B, H/p, W/p, T, S, D)     S = number of bandsets of the modality
    mask[modality]:   int8 (B, H/p, W/p, T, S)    values below

Flattened sequence order (encoder/decoder input): modalities in registry order, then (h, w, t, s)
row-major inside a modality.

A training batch (what the data pipeline yields and the objective consumes) is a dict:
    {"x": {modality: (B, H, W, T, C)} normalised, NaN replaced by 0 (the mask says what is missing),
     "months": (B, T),
     "patch_size": int,
     "mask_a": {modality: (B, h, w, T, S)},  "mask_b": {...}}   two independently masked views
"""

# Mask values (as the original): which role each token plays in one masked view.
ENCODER = 0  # visible to the online encoder
IGNORED = 1  # present but neither encoded nor decoded in this view (original: TARGET_ENCODER_ONLY)
DECODER = 2  # hidden from the encoder; the decoder predicts its target
MISSING = 3  # no data (missing timestep, bandset, modality or any missing pixel inside the patch)

# Augmentation (olmoearth/model.py): the two views of a batch share one "x"; in training mode the model
# itself gives each view its own random D4 flip/rotation (one per view per batch), applied to x (pixels)
# and that view's mask (token grid) alike, before encoding. The data pipeline does not flip or rotate.
# Masks come from `olmoearth.masking` (per sample, numpy, in the data workers).
