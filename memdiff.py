"""memdiff: a single-file reference implementation of "On Memorization in Diffusion Models".

What is in this file, in the order of the science:
  1. data           -- the bundled digits, .npz, CIFAR-10 and PNG zips; the study's first-k subsets
  2. network        -- the DDPM++ / NCSN++ U-Net of the study, parameter for parameter [2, 3]
  3. precond        -- EDM, VP and VE preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) [2]
  4. losses         -- per-sample denoising score-matching losses of EDM, VP and VE [2]
  5. sampler        -- the EDM Heun sampler (Algorithm 2 of [2]) for *any* denoiser
  6. optimum        -- the closed-form optimal denoiser D* of a finite training set [1, eq. 4]
  7. metric         -- nearest neighbours, the memorization ratio and its Wilson interval [1, sec. 3]
  8. training       -- the training loop: Adam/SGD, lr ramp-up, EMA, snapshots, resume, DDP
  9. measurement    -- memorization of one training set, and the search for EMM [1, eq. 5]

What is not: the authors' augmentation pipeline (the study trains without it), FID, and anything that
needs a download at run time.

References:
  [1] X. Gu, C. Du, T. Pang, C. Li, M. Lin, Y. Wang. On Memorization in Diffusion Models.
      TMLR 2025, arXiv:2310.02664. Code: github.com/sail-sg/DiffMemorize.
  [2] T. Karras, M. Aittala, T. Aila, S. Laine. Elucidating the Design Space of Diffusion-Based
      Generative Models. NeurIPS 2022, arXiv:2206.00364. Code: github.com/NVlabs/edm.
  [3] Y. Song, J. Sohl-Dickstein, D. Kingma, A. Kumar, S. Ermon, B. Poole. Score-Based Generative
      Modeling through Stochastic Differential Equations. ICLR 2021 (DDPM++ and NCSN++).
  [4] E. B. Wilson. Probable inference, the law of succession, and statistical inference. JASA 1927.
"""

import contextlib
import copy
import gzip
import io
import json
import math
import os
import pickle
import random
import tarfile
import zipfile
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / 'data'

#----------------------------------------------------------------------------
# 1. Data. Images are float32 [N, C, H, W] in [-1, 1] (the study scales pixels as u/127.5 - 1),
# labels int64 [N] or None. The builders are the study's dataset tools [1, dataset_utils/]: the first
# |D|/C images of each class in file order, LANCZOS down-sampling on uint8 pixels, and its label
# draws. No augmentation, no x-flip: the study trains on the raw subset.

def _fail(source, problem):
    raise ValueError(f'{source}: {problem}')

def _check_images(images, source):
    """Validate an array of images -> numpy [N, C, H, W]: uint8 kept as uint8, anything else as
    float32 in [-1, 1]. Pixels stay uint8 until after resizing, as in the study's tools."""
    images = np.asarray(images)
    if images.ndim == 3:                                    # [N, H, W]: one channel
        images = images[:, None]
    if images.ndim != 4:
        _fail(source, f'images must have rank 3 or 4 (N x C x H x W or N x H x W x C), got shape '
              f'{tuple(images.shape)}')
    nchw = images.shape[1] in (1, 3, 4) and images.shape[2] == images.shape[3]
    nhwc = images.shape[3] in (1, 3, 4) and images.shape[1] == images.shape[2]
    if nhwc and not nchw:
        images = images.transpose(0, 3, 1, 2)               # NHWC -> NCHW (square images)
    if images.shape[0] == 0:
        _fail(source, 'the data set holds no images')
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.number) and not np.issubdtype(images.dtype, np.complexfloating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            _fail(source, 'images contain NaN or inf')
        if images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6:
            _fail(source, f'float images must lie in [-1, 1] (or be uint8 0..255), got range '
                  f'[{images.min():.3g}, {images.max():.3g}]')
    else:
        _fail(source, f'images have unsupported dtype {images.dtype}')
    return np.ascontiguousarray(images)

def _check_labels(labels, n, source):
    """Validate labels: int64 [N] with values >= 0, or None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2:                                    # one-hot rows, as in EDM's dataset.json
        labels = labels.argmax(1)
    if labels.ndim != 1 or len(labels) != n:
        _fail(source, f'labels must be a vector of {n} entries (one per image), got shape '
              f'{tuple(labels.shape)}')
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            _fail(source, 'labels must be integers')
    if labels.min() < 0:
        _fail(source, 'labels must be non-negative')
    return torch.from_numpy(labels.astype(np.int64))

def _load_digits():
    """The bundled UCI digits: 1,797 images 1x8x8, values 0..16 mapped to v/8 - 1, labels 0..9."""
    path = DATA_DIR / 'digits.csv.gz'
    if not path.is_file():
        _fail(path, 'the bundled digits are missing from the installation')
    with gzip.open(path, 'rt') as f:
        table = np.loadtxt(f, delimiter=',', dtype=np.float32)
    images = table[:, :64].reshape(-1, 1, 8, 8) / 8 - 1    # not uint8: kept float32 (SPEC §8)
    return np.ascontiguousarray(images), torch.from_numpy(table[:, 64].astype(np.int64))

def _load_npz(path):
    """The study's npz layout: 'images' (NCHW or NHWC, uint8 or float) and optional 'labels'."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if 'images' not in z:
                _fail(path, f"no 'images' array in the npz (found: {', '.join(z.files) or 'nothing'})")
            images, labels = z['images'], (z['labels'] if 'labels' in z else None)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        _fail(path, f'not a readable .npz file ({e})')
    images = _check_images(images, path)
    return images, _check_labels(labels, len(images), path)

def _load_cifar10(path):
    """CIFAR-10 python version (tar.gz or extracted folder): the five training batches, in order."""
    names = [f'data_batch_{i}' for i in range(1, 6)]
    batches = []
    try:
        if path.is_dir():
            folder = path / 'cifar-10-batches-py' if (path / 'cifar-10-batches-py').is_dir() else path
            for name in names:
                with open(folder / name, 'rb') as f:
                    batches.append(pickle.load(f, encoding='latin1'))
        else:
            with tarfile.open(path, 'r:gz') as tar:
                for name in names:
                    batches.append(pickle.load(tar.extractfile(f'cifar-10-batches-py/{name}'),
                                               encoding='latin1'))
    except (OSError, KeyError, tarfile.TarError, pickle.UnpicklingError, EOFError) as e:
        _fail(path, f'not a CIFAR-10 python archive ({e})')
    images = np.concatenate([b['data'] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b['labels'] for b in batches])
    return _check_images(images, path), _check_labels(labels, len(images), path)

def _load_png_zip(path):
    """EDM-style zip of PNGs with optional dataset.json {"labels": [[name, label], ...]}, the images
    in sorted name order as EDM's ImageFolderDataset reads them."""
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith('.png'))
            if not names:
                _fail(path, 'the zip holds no PNG images')
            images = [np.array(PIL.Image.open(io.BytesIO(z.read(n)))) for n in names]
            meta = json.loads(z.read('dataset.json')) if 'dataset.json' in z.namelist() else {}
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        _fail(path, f'not a readable zip of PNGs ({e})')
    if len({im.shape for im in images}) != 1:
        _fail(path, 'the PNG images do not all have the same shape')
    images = np.stack(images)
    labels = None
    if (meta or {}).get('labels') is not None:
        table = dict(meta['labels'])
        if set(names) - set(table):
            _fail(path, 'dataset.json has no label for some images')
        labels = [table[n] for n in names]
    return _check_images(images, path), _check_labels(labels, len(images), path)

def downsample(images, resolution):
    """Resize images [N, C, H, W] to [N, C, resolution, resolution] with Pillow's LANCZOS filter, as
    the study's dataset_tool.py does; uint8 stays uint8 (Pillow rounds and clips), float stays float.
    Takes and returns a numpy array or a torch tensor; resolution == H returns the input."""
    H = images.shape[-1]
    if images.shape[-2] != H:
        raise ValueError(f'images must be square to resize, got {H} x {images.shape[-2]}')
    # dataset_tool.py refuses outputs whose side is not a power of two.
    if resolution < 1 or resolution & (resolution - 1) or resolution > H:
        raise ValueError(f'resolution {resolution} must be a power of two no larger than the image '
                         f'size {H}')
    if resolution == H:
        return images
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    # One channel at a time: mode 'L' for uint8 gives exactly Pillow's RGB resize of dataset_tool.py
    # (Pillow filters each band alone); float sources (the digits) use mode 'F', the same filter
    # without rounding, clipped to [-1, 1] as Pillow clips uint8 to 0..255.
    out = np.empty(x.shape[:2] + (resolution, resolution), x.dtype)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            band = PIL.Image.fromarray(np.ascontiguousarray(x[i, c]))
            out[i, c] = np.asarray(band.resize((resolution, resolution), PIL.Image.LANCZOS))
    if out.dtype != np.uint8:
        out = out.clip(-1, 1)
    return torch.from_numpy(out) if isinstance(images, torch.Tensor) else out

def load_dataset(spec, resolution=None, classes=None):
    """Load a data set by name or path -> (images float32 [N, C, H, W] in [-1, 1], labels [N] or None)."""
    spec = str(spec)
    if spec == 'digits':
        images, labels = _load_digits()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            _fail(spec, "no such file or folder (use 'digits', a .npz, CIFAR-10 python archive "
                  "or folder, or an EDM-style .zip of PNGs)")
        name = path.name.lower()
        if name.endswith('.npz'):
            images, labels = _load_npz(path)
        elif name.endswith(('.tar.gz', '.tgz')) or path.is_dir():
            images, labels = _load_cifar10(path)
        elif name.endswith('.zip'):
            images, labels = _load_png_zip(path)
        else:
            _fail(spec, 'unknown data format (expected .npz, .tar.gz, a folder or .zip)')
    if classes is not None:                                 # classes 0..C-1 [dataset_diversity.py]
        if labels is None:
            _fail(spec, f'classes={classes} needs labels, and the data set has none')
        num_classes = int(labels.max()) + 1
        if not 1 <= classes <= num_classes:
            _fail(spec, f'classes={classes} but the data set has {num_classes} classes')
        keep = (labels < classes).numpy()
        images, labels = images[keep], labels[keep]
    if resolution is not None:
        try:
            images = downsample(images, resolution)
        except ValueError as e:
            _fail(spec, str(e))
    images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1                 # u/127.5 - 1 [training/training_loop.py]
    return images.contiguous(), labels

def _class_shares(labels, n):
    """(classes present [C], images taken from each [C]) of the study's first-k rule for size n."""
    classes = torch.unique(labels)                          # ascending: 0..C-1 for the study's data
    C = len(classes)
    k = n // C
    shares = [k] * (C - 1) + [n - k * (C - 1)]              # the remainder goes to the last class
    return classes.tolist(), shares

def balanced_subset(labels, n):
    """Indices [n] of the study's training set of size n, class-sorted: for each class c = 0..C-1 the
    first k = n // C images of c in file order, the last class taking n - k (C - 1) (dataset_size.py
    for C | n, dataset_diversity.py otherwise); the first n images when labels is an int N
    (unlabelled). No seed. Subset m lies inside subset n >= m iff the last class's share does not
    shrink, m - (C-1) floor(m/C) <= n - (C-1) floor(n/C): always when C divides m."""
    if isinstance(labels, int):
        N = labels
    elif labels is None:
        raise ValueError('balanced_subset needs the labels [N], or the data set size N when unlabelled')
    else:
        N = len(labels)
    if not 1 <= n <= N:
        raise ValueError(f'subset size {n} must lie in 1..{N} (the data set size)')
    if isinstance(labels, int):
        return torch.arange(n)
    labels = torch.as_tensor(labels)
    picks = []
    for c, share in zip(*_class_shares(labels, n)):
        members = torch.nonzero(labels == c).flatten()      # file order
        if len(members) < share:
            raise ValueError(f'subset size {n}: class {c} has {len(members)} images, fewer than '
                             f'its share {share} of the first-k rule')
        picks.append(members[:share])
    return torch.cat(picks)

def max_subset_size(labels):
    """The largest n such that balanced_subset(labels, m) exists for every m in 1..n (an int N: N).
    With classes of unequal size not every smaller size need exist beyond it."""
    if isinstance(labels, int):
        return labels
    counts = torch.unique(torch.as_tensor(labels), return_counts=True)[1].tolist()
    C, first = len(counts), min(counts[:-1], default=len(labels))
    for n in range(1, len(labels) + 1):                     # the shares of _class_shares
        if n // C > first or n - (n // C) * (C - 1) > counts[-1]:
            return n - 1
    return len(labels)

def assign_labels(labels, mode, n=None):
    """Class labels of the study's files for a training set in class-sorted order -> (labels int64
    [n] or None, label_dim = max label + 1, as EDM's dataset reads it; 0 for 'none')."""
    mode = str(mode)
    if mode == 'none':
        return None, 0
    if mode == 'true':
        if labels is None:
            raise ValueError("label mode 'true' needs a data set with labels")
        return labels, int(labels.max()) + 1
    n = len(labels) if labels is not None else n
    if n is None:
        raise ValueError(f"label mode '{mode}' needs the subset size n when the data has no labels")
    if mode == 'unique':
        return torch.arange(n), n                           # image i: label i [dataset_unique.py]
    if mode.startswith('random:'):
        try:
            C = int(mode.split(':', 1)[1])
        except ValueError:
            C = 0
        if C < 1:
            raise ValueError(f"label mode '{mode}': random:C needs a whole number of classes C >= 1")
        # dataset_random.py: random.seed(1024), then one randint(0, C - 1) per image of the set, in
        # class-sorted order. A private Random(1024) draws the same sequence, global state untouched.
        rng = random.Random(1024)
        out = torch.tensor([rng.randint(0, C - 1) for _ in range(n)], dtype=torch.int64)
        return out, int(out.max()) + 1
    raise ValueError(f"unknown label mode '{mode}' (expected none, true, random:C or unique)")

def quantize_uint8(x):
    """Round images in [-1, 1] to the study's 8-bit grid (x*127.5 + 128, clipped, truncated), same scale."""
    return to_uint8(x).to(x.dtype) / 127.5 - 1

def to_uint8(x):
    """Images in [-1, 1] -> uint8 pixels, exactly as EDM's generate.py writes its PNGs."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

def one_hot(labels, label_dim):
    """Integer labels [B] -> one-hot float32 rows [B, label_dim] (None stays None)."""
    if labels is None:
        return None
    return F.one_hot(labels.long(), label_dim).float()

#----------------------------------------------------------------------------
# 2. Network: the DDPM++ / NCSN++ U-Net of Song et al. [3] as re-implemented in EDM [2] and used
# unchanged by the study [1]. Parameter counts are the acceptance test (SPEC §5).

def _init(layer, scale=1.0):
    """Xavier-uniform weight times scale and zero bias, as EDM initialises every layer."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    nn.init.zeros_(layer.bias)
    return layer

def _group_norm(channels):
    """GroupNorm with min(32, C//4) groups and eps 1e-6, the EDM/DDPM++ setting."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)

class Resample(nn.Module):
    """2x up- or down-sampling with a separable FIR filter (taps [1,1] = average pool / nearest)."""
    def __init__(self, mode, taps=(1, 1)):
        super().__init__()
        f = torch.as_tensor(taps, dtype=torch.float32)
        self.register_buffer('f', f.outer(f) / f.sum().square(), persistent=False)  # sums to 1
        self.mode, self.pad = mode, (len(taps) - 1) // 2
        self.box = tuple(taps) == (1, 1)

    def forward(self, x):
        if self.box:                                        # fused kernels for the DDPM++ filter
            return F.avg_pool2d(x, 2) if self.mode == 'down' else F.interpolate(x, scale_factor=2.0)
        C = x.shape[1]
        w = self.f.to(x.dtype).tile([C, 1, 1, 1])           # [C, 1, k, k] depthwise
        if self.mode == 'down':
            return F.conv2d(x, w, groups=C, stride=2, padding=self.pad)
        return F.conv_transpose2d(x, w * 4, groups=C, stride=2, padding=self.pad)

class Block(nn.Module):
    """Residual block with the embedding added after the first conv, optional resampling and attention."""
    def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False, dropout=0.0,
                 taps=(1, 1)):
        super().__init__()
        self.resample = Resample('up' if up else 'down', taps) if up or down else nn.Identity()
        self.norm0 = _group_norm(cin)
        self.conv0 = _init(nn.Conv2d(cin, cout, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, cout))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(cout, cout, 3, padding=1), 1e-5)  # block starts near identity
        self.skip = _init(nn.Conv2d(cin, cout, 1)) if cin != cout or up or down else None
        self.attention = attention
        if attention:
            self.norm2 = _group_norm(cout)
            self.qkv = _init(nn.Conv2d(cout, cout * 3, 1), math.sqrt(0.2))
            self.proj = _init(nn.Conv2d(cout, cout, 1), 1e-5)
        self.in_channels = cin

    def forward(self, x, emb):
        orig = x
        x = self.conv0(self.resample(F.silu(self.norm0(x))))
        x = x + self.affine(emb)[:, :, None, None]          # embedding broadcast over pixels
        x = self.conv1(self.dropout(F.silu(self.norm1(x))))
        skip = self.skip(self.resample(orig)) if self.skip is not None else orig
        x = (x + skip) * math.sqrt(0.5)
        if self.attention:                                  # one head, softmax over keys
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])  # [B,1,HW,C]
            x = (self.proj(a[:, 0].transpose(1, 2).reshape(B, C, H, W)) + x) * math.sqrt(0.5)
        return x

class UNet(nn.Module):
    """DDPM++ or NCSN++ U-Net: F(x [B,C,H,W], c_noise [B], labels [B,L]) -> [B,C',H,W]."""
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=128,
                 channel_mult=(2, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.13,
                 arch='ddpmpp', embedding=None, skips=None):
        super().__init__()
        if arch not in ('ddpmpp', 'ncsnpp'):
            raise ValueError(f"arch must be 'ddpmpp' or 'ncsnpp', got {arch!r}")
        embedding = embedding or ('positional' if arch == 'ddpmpp' else 'fourier')
        if embedding not in ('positional', 'fourier'):
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {embedding!r}")
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f'image resolution {img_resolution} is not divisible by '
                             f'2^{len(channel_mult) - 1} (one halving per level of channel_mult)')
        if model_channels < 4 or model_channels % 4:
            raise ValueError(f'model_channels must be a positive multiple of 4, got {model_channels}')
        num_skips = len(channel_mult) * (num_blocks + 1)
        skips = [1] * num_skips if skips is None else [int(s) for s in skips]
        if len(skips) != num_skips or set(skips) - {0, 1}:
            raise ValueError(f'skips must be {num_skips} values of 0/1 (one per encoder output), '
                             f'got {skips}')
        self.label_dim, self.img_resolution = label_dim, img_resolution
        self.in_channels, self.out_channels = in_channels, out_channels
        self.arch, self.embedding, self.skips = arch, embedding, skips
        taps = (1, 1) if arch == 'ddpmpp' else (1, 3, 3, 1)
        noise_channels = model_channels * (1 if arch == 'ddpmpp' else 2)  # channel_mult_noise
        emb_channels = model_channels * 4
        block = dict(emb_channels=emb_channels, dropout=dropout, taps=taps)

        # Mapping: c_noise (and label) -> embedding e.
        if embedding == 'fourier':                          # fixed random frequencies ~ N(0, 16^2)
            self.register_buffer('freqs', torch.randn(noise_channels // 2) * 16)
        else:                                               # (1/10000)^(k/(K-1)), k = 0..K-1
            K = noise_channels // 2
            self.register_buffer('freqs', (1 / 10000) ** (torch.arange(K) / (K - 1)))
        self.map_label = _init(nn.Linear(label_dim, noise_channels)) if label_dim else None
        self.map_layer0 = _init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))

        # Encoder: every output (first conv, each down block, each block) is pushed as a skip.
        self.enc = nn.ModuleDict()
        self.aux = nn.ModuleDict()                          # NCSN++'s residual input path
        cout, caux, skip_channels = in_channels, in_channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f'{res}_conv'] = _init(nn.Conv2d(in_channels, cout, 3, padding=1))
            else:
                self.enc[f'{res}_down'] = Block(cout, cout, down=True, **block)
                if arch == 'ncsnpp':
                    self.aux[f'{res}'] = nn.Sequential(_init(nn.Conv2d(caux, cout, 3, padding=1)),
                                                       Resample('down', taps))
                    caux = cout
            skip_channels.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}_block{i}'] = Block(cin, cout, attention=res in attn_resolutions,
                                                    **block)
                skip_channels.append(cout)

        # Decoder: the lowest level opens with two blocks (attention in the first), the others with
        # an up-sampling block; each then takes num_blocks + 1 skips.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}_in0'] = Block(cout, cout, attention=True, **block)
                self.dec[f'{res}_in1'] = Block(cout, cout, **block)
            else:
                self.dec[f'{res}_up'] = Block(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f'{res}_block{i}'] = Block(cin, cout, attention=attn, **block)
        self.out_norm = _group_norm(cout)
        self.out_conv = _init(nn.Conv2d(cout, out_channels, 3, padding=1), 1e-5)

    def forward(self, x, noise_labels, class_labels=None):
        # Mapping: [cos, sin] of c_noise * frequencies, halves swapped (sin first), + label, 2-layer MLP.
        c = noise_labels.to(torch.float32).reshape(-1)
        c = c.expand(x.shape[0]) if c.numel() == 1 else c
        f = 2 * math.pi * self.freqs if self.embedding == 'fourier' else self.freqs
        arg = c.outer(f)                                    # [B, K]
        emb = torch.cat([arg.sin(), arg.cos()], dim=1)      # [B, noise_channels]
        if self.map_label is not None:
            if class_labels is None:                        # unconditional call: all-zero label
                class_labels = x.new_zeros(x.shape[0], self.label_dim)
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # [B, 4 * model_channels]

        # Encoder.
        skips, aux = [], x
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith('_conv') else layer(x, emb)
            if name.endswith('_down') and name[:-5] in self.aux:  # NCSN++ residual path
                x = aux = (x + self.aux[name[:-5]](aux)) / math.sqrt(2)
            skips.append(x)
        skips = [s if on else torch.zeros_like(s) for s, on in zip(skips, self.skips)]

        # Decoder: concatenate [features, skip] where a block expects more channels.
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# 3. Preconditioning [2, Table 1]: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with the network
# boundary in float32. Class labels enter as one-hot rows.

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()

def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    """Inverse of vp_sigma: t(sigma)."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * sigma.square().log1p()).sqrt() - beta_min) / beta_d

class Precond(nn.Module):
    """D(x [B,C,H,W], sigma [B] or float, labels [B,L]) -> denoised [B,C,H,W] (float32), EDM/VP/VE."""
    def __init__(self, net, kind='edm', sigma_data=0.5, beta_d=19.9, beta_min=0.1, M=1000):
        super().__init__()
        if kind not in ('edm', 'vp', 've'):
            raise ValueError(f"precond kind must be 'edm', 'vp' or 've', got {kind!r}")
        self.net, self.kind, self.sigma_data = net, kind, sigma_data
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M
        self.label_dim = getattr(net, 'label_dim', 0)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at noise level sigma (tensor)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.kind == 'edm':
            sd = self.sigma_data
            c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
            c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
            c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
            c_noise = sigma.log() / 4
        elif self.kind == 'vp':
            c_skip = torch.ones_like(sigma)
            c_out = -sigma
            c_in = 1 / (sigma ** 2 + 1).sqrt()
            c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        else:
            c_skip = torch.ones_like(sigma)
            c_out = sigma
            c_in = torch.ones_like(sigma)
            c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        if class_labels is not None:
            class_labels = class_labels.to(torch.float32)
        F_x = self.net(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

#----------------------------------------------------------------------------
# 4. Losses [2, Table 1], per sample: lambda(sigma) * ||D(y + n; sigma) - y||^2 summed over pixels,
# n ~ N(0, sigma^2 I). Each draws its own sigma from the generator it is given.

def _randn(shape, like, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

def _weighted_loss(denoise, y, sigma, weight, class_labels, generator):
    n = _randn(y.shape, y, generator) * sigma
    D_yn = denoise(y + n, sigma, class_labels)
    return (weight * (D_yn - y) ** 2).flatten(1).sum(1)    # [B]

def edm_loss(denoise, y, class_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, generator=None):
    """EDM loss [B]: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2."""
    sigma = (_randn([y.shape[0], 1, 1, 1], y, generator) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    return _weighted_loss(denoise, y, sigma, weight, class_labels, generator)

def vp_loss(denoise, y, class_labels=None, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, generator=None):
    """VP loss [B]: t ~ U(epsilon_t, 1), sigma = sigma(t), lambda = 1 / sigma^2."""
    u = torch.rand([y.shape[0], 1, 1, 1], generator=generator, device=y.device)
    sigma = vp_sigma(1 + u * (epsilon_t - 1), beta_d, beta_min)
    return _weighted_loss(denoise, y, sigma, 1 / sigma ** 2, class_labels, generator)

def ve_loss(denoise, y, class_labels=None, sigma_min=0.02, sigma_max=100, generator=None):
    """VE loss [B]: sigma log-uniform on [sigma_min, sigma_max], lambda = 1 / sigma^2."""
    u = torch.rand([y.shape[0], 1, 1, 1], generator=generator, device=y.device)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    return _weighted_loss(denoise, y, sigma, 1 / sigma ** 2, class_labels, generator)

LOSSES = {'edm': edm_loss, 'vp': vp_loss, 've': ve_loss}

#----------------------------------------------------------------------------
# 5. Sampler: EDM's Heun solver of the probability-flow ODE dx/dt = (x - D(x; t)) / t [2, Alg. 2],
# with the optional churn of its stochastic variant. Any denoiser (x, sigma, labels) -> D(x) fits.

def edm_sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """Noise levels t_0 = sigma_max > ... > t_{n-1} = sigma_min, t_n = 0 [2, eq. 5], float64 [n+1]."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])

@torch.no_grad()
def edm_sampler(denoise, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80,
                rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, generator=None):
    """Heun-sample from unit-variance latents [B,...] -> samples [B,...] in the latents' dtype."""
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily (churn); gamma = 0 gives the deterministic sampler.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, device=x_cur.device,
                              dtype=torch.float64)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps

        # Euler step.
        denoised = denoise(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction (not on the last step, where t_next = 0).
        if i < num_steps - 1:
            denoised = denoise(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(latents.dtype)

#----------------------------------------------------------------------------
# 6. The optimal denoiser [1, eq. 4]: the minimiser of the denoising objective on a finite training
# set {y_i}, D*(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i. It is evaluated chunk by
# chunk over the training set with a running log-sum-exp (online softmax), so memory is
# O(batch x chunk) and never O(batch x N).

class OptimalDenoiser:
    """D*(x [B,...], sigma [B] or float, labels [B,C] one-hot or [B] int) -> [B,...] over a training set."""
    def __init__(self, images, labels=None, chunk=4096):
        self.shape = tuple(images.shape[1:])
        self.y = images.reshape(len(images), -1)            # [N, d], kept in the caller's dtype
        self.half_sq = torch.linalg.vector_norm(self.y, dim=1).square_() / 2  # [N] ||y_i||^2 / 2
        self.log_tiny = math.log(torch.finfo(self.y.dtype).tiny)
        self.labels = None if labels is None else labels.to(self.y.device).long()
        self.label_dim = 0 if labels is None else int(self.labels.max()) + 1
        self.chunk = int(chunk)

    def __call__(self, x, sigma, class_labels=None):
        B = x.shape[0]
        xf = x.reshape(B, -1).to(self.y.dtype)              # [B, d]
        sigma = torch.as_tensor(sigma, dtype=self.y.dtype, device=xf.device).reshape(-1)
        # -||x - y||^2 / 2 sigma^2 = (x.y - ||y||^2/2) / sigma^2 + const(x); the constant cancels in
        # the softmax. sigma = 0 is the nearest-neighbour limit: a tiny floor keeps every logit finite
        # while still separating any two distinct distances.
        inv_var = 1 / (sigma ** 2).clamp_min(torch.finfo(self.y.dtype).tiny ** 0.5)
        inv_var = inv_var.expand(B)[:, None]                # [B, 1]
        c = self._classes(class_labels, B)                  # [B] or None
        m = xf.new_full((B, 1), -math.inf)                  # running max of the logits
        s = xf.new_zeros(B, 1)                              # running sum of exp(logit - m)
        acc = xf.new_zeros(B, xf.shape[1])                  # running sum of exp(logit - m) y
        # One [B, chunk] buffer, reused by every chunk and updated in place: peak memory stays
        # ~B x chunk (a fresh one per chunk would briefly hold two).
        buf = xf.new_empty(B * min(self.chunk, len(self.y)))
        for j in range(0, len(self.y), self.chunk):
            y, hs = self.y[j:j + self.chunk], self.half_sq[j:j + self.chunk]
            # The bias and scale go in place: addmm would first copy hs into every row, a pass more.
            logits = torch.mm(xf, y.T, out=buf[:B * len(y)].view(B, len(y)))
            logits.sub_(hs).mul_(inv_var)                   # [B, chunk]
            if c is not None:
                logits.masked_fill_(c[:, None] != self.labels[None, j:j + self.chunk], -math.inf)
            m_new = torch.maximum(m, logits.amax(1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0)  # rows with no image of their class yet
            # Weights below the smallest normal float are zero to working precision; flushing them
            # keeps the matmul off the CPU's slow denormal path (a 20x slowdown at large d).
            p = F.threshold_(logits.sub_(m_safe), self.log_tiny, -math.inf).exp_()  # [B, chunk]
            rescale = (m - m_safe).exp()
            s.mul_(rescale).add_(p.sum(1, keepdim=True))
            acc.mul_(rescale).addmm_(p, y)                 # in place: no [B, d] temporaries
            m = m_new
        return acc.div_(s).reshape(B, *self.shape).to(x.dtype)

    def _classes(self, class_labels, B):
        """Class index per sample [B] from one-hot rows or integers; None for the unconditional optimum."""
        if class_labels is None or self.labels is None:
            return None
        c = class_labels.argmax(1) if class_labels.ndim == 2 else class_labels
        c = c.to(self.labels.device).long().expand(B)
        missing = set(c.unique().tolist()) - set(self.labels.unique().tolist())
        if missing:
            raise ValueError(f'no training image has class {sorted(missing)[0]}: the conditional '
                             'optimum is undefined there')
        return c

#----------------------------------------------------------------------------
# 7. Memorization metric [1, sec. 3]: a sample x is memorized when ||x - NN_1|| < 1/3 ||x - NN_2||,
# NN_1 and NN_2 its nearest and second-nearest training images (L2 over pixels). The memorization
# ratio is the fraction of samples memorized; its uncertainty is the Wilson score interval [4].

def _smallest(d2, k, g=8):
    """The k smallest entries of each row of d2 [B, M] -> (values [B, k], column indices [B, k])."""
    B, M = d2.shape
    nb = M // g
    if nb < 128 or d2.device.type != 'cpu' or d2.stride(1) != 1:  # topk is as fast there
        return d2.topk(k, dim=1, largest=False)
    # On a CPU topk visits the entries one by one, where amin is vectorised. Columns c, c + nb, ...,
    # c + (g-1) nb form block c: the k smallest entries lie in the k blocks with the smallest
    # minima (any other block's minimum is beaten by those k minima), so topk only sees those
    # k*g columns and the M - g*nb left over.
    blocks = d2.as_strided((B, g, nb), (d2.stride(0), nb, 1))
    c = blocks.amin(1).topk(k, dim=1, largest=False).indices  # [B, k]
    cols = torch.cat([(c[:, :, None] + nb * torch.arange(g)).reshape(B, k * g),
                      torch.arange(g * nb, M).expand(B, -1)], 1)  # [B, k*g + M - g*nb]
    v, pos = d2.gather(1, cols).topk(k, dim=1, largest=False)
    return v, cols.gather(1, pos)

def nearest_neighbors(samples, reference, k=2, chunk=4096):
    """k nearest references of each sample -> (L2 distances [B, k] ascending, indices [B, k])."""
    B, N = samples.shape[0], reference.shape[0]
    if N < k:
        raise ValueError(f'need at least k={k} reference images, got {N}')
    ref = reference.reshape(N, -1)                          # [N, d]
    x = samples.reshape(B, ref.shape[1]).to(ref.dtype)      # [B, d], B = 0 too: a rank's share
    minus_2x = -2 * x                                       # exact: a power of two
    for j in range(0, N, chunk):
        y = ref[j:j + chunk]
        # vector_norm reads y once; y.square().sum(1) would write a [chunk, d] temporary first,
        # which at d = 3072 costs more than the matrix product itself. The bias is added in place:
        # addmm would first copy it into every row of the output, a pass more.
        y_sq = torch.linalg.vector_norm(y, dim=1).square_()  # [chunk]
        d2 = torch.mm(minus_2x, y.T).add_(y_sq)             # ||x-y||^2 - ||x||^2: same order
        d2, i = _smallest(d2, min(k, len(y)))                # [B, k] of this chunk
        if j > 0:                                           # merge with the best so far
            d2, i = torch.cat([best_d, d2], 1), torch.cat([best_i, i + j], 1)
            d2, pos = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
            i = i.gather(1, pos)
        best_d, best_i = d2, i
    # Recompute the k winners exactly: the expansion above loses the small distances to rounding,
    # and an exact copy must have distance exactly 0.
    dist = torch.linalg.vector_norm(x[:, None] - ref[best_i], dim=2)  # [B, k]
    dist, order = dist.sort(dim=1)
    return dist, best_i.gather(1, order)

def memorization_scores(samples, reference, threshold=1/3, chunk=4096):
    """Per-sample ratio d1/d2 [B] and memorized mask [B] (ratio < threshold) against a reference set."""
    # Exact duplicates in the reference set would give d2 = 0 for a perfect copy of one of them; a
    # duplicated image is one training image, so the reference set is deduplicated first.
    reference = torch.unique(reference.reshape(len(reference), -1), dim=0)
    if len(reference) < 2:
        raise ValueError('the memorization metric needs at least 2 distinct reference images')
    d, _ = nearest_neighbors(samples, reference, k=2, chunk=chunk)
    ratio = d[:, 0] / d[:, 1]                               # d2 > 0: at most one reference at 0
    return ratio, ratio < threshold

def memorization_ratio(samples, reference, threshold=1/3, chunk=4096):
    """Fraction of samples [B, ...] memorized with respect to the reference set [N, ...]."""
    return memorization_scores(samples, reference, threshold, chunk)[1].double().mean().item()

def wilson_interval(k, n, z=1.96):
    """Wilson score interval (low, high) for k successes in n trials [4]."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))  # exact at k = 0, n

#----------------------------------------------------------------------------
# 8. Training: the loop of EDM's training_loop.py as the study ran it [1, sec. 4; 2, App. F]:
# Adam (or SGD), linear learning-rate ramp-up, EMA of the weights, snapshots of the EMA network.
# Durations scale with the training-set size as in the study, so they are given in epochs (passes
# over |D|) or, for fixed-budget experiments, in optimizer steps. Under torchrun the global batch
# is split across the ranks and DDP averages the gradients: same batch, same learning rate.

@dataclass
class TrainConfig:
    """How one network is trained; defaults are the CPU digits setting (SPEC §7)."""
    precond: str = 'edm'            # 'edm' | 'vp' | 've' (the study's CIFAR-10 runs use 'vp')
    optimizer: str = 'adam'         # 'adam' | 'sgd' (momentum 0.9)
    lr: float = 1e-3
    batch: int = 64                 # global batch, split across ranks
    weight_decay: float = 0.0       # L2 penalty inside the optimizer, as torch's Adam applies it
    steps: int = 1500               # duration in optimizer steps, unless epochs is set
    epochs: float = None            # duration in passes over |D| (the study: 40,000)
    lr_rampup_epochs: float = 0.0   # linear warm-up (the study: 200 epochs = |D|/5 kimg)
    ema_halflife_epochs: float = 10.0  # EMA half-life (the study: 10 epochs = 0.5 |D|/50 kimg)
    ema_rampup: float = 0.05        # EDM: half-life at most this fraction of the images seen so far
    ema_beta: float = None          # fixed per-step EMA decay instead of a half-life
    snapshots: int = 3              # evenly spaced snapshots of the EMA network (the last at the end)
    snapshot_images: int = None     # or one every so many images (the study: 2.5M)
    amp: bool = False               # bf16 autocast for the network (the study ran fp32)

    def total_steps(self, n):
        """Optimizer steps for a training set of n images."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n / self.batch))
        return self.steps

    def snapshot_steps(self, n):
        """Steps (ascending, the last one final) at which the EMA network is evaluated."""
        total = self.total_steps(n)
        if self.snapshot_images:
            every = math.ceil(self.snapshot_images / self.batch)
            return sorted(set(range(every, total, every)) | {total})
        S = min(self.snapshots, total)
        return sorted({round(total * k / S) for k in range(1, S + 1)})

def dist_info():
    """(rank, world_size) of this process; (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

def _atomic_save(obj, path):
    """torch.save to a temporary file, then rename: an interrupted write never leaves half a file."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)

def train(precond, images, labels=None, cfg=TrainConfig(), seed=0, checkpoint=None, progress=None):
    """Train precond on images [n,C,H,W] (one-hot labels [n,L]); yield (step, EMA copy) at each snapshot.

    With `checkpoint` (a path), the full state is saved at every snapshot and a rerun resumes from it.
    """
    rank, world = dist_info()
    if cfg.batch % world:
        raise ValueError(f'batch {cfg.batch} is not divisible by the {world} processes')
    device = images.device
    n = len(images)
    total, snaps = cfg.total_steps(n), cfg.snapshot_steps(n)
    ema = copy.deepcopy(precond).eval().requires_grad_(False)
    params = [p for p in precond.parameters() if p.requires_grad]
    if cfg.optimizer == 'adam':
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=cfg.weight_decay)
    elif cfg.optimizer == 'sgd':
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    # Batch indices are drawn identically on every rank (each then takes its slice of the global
    # batch); the noise of the loss is drawn per rank.
    g_data = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator(device=device).manual_seed(seed * 1000 + 1 + rank)
    step = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        precond.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        opt.load_state_dict(state['opt'])
        g_data.set_state(state['g_data'])
        rng = state['rng'][rank] if rank < len(state['rng']) else state['rng'][0]
        g_noise.set_state(rng['noise'])
        torch.set_rng_state(rng['torch'])
        if rng['cuda'] is not None and device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'], device)
        step = state['step']
    model = precond
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            precond, device_ids=[device.index] if device.type == 'cuda' else None)
    loss_fn = LOSSES[precond.kind]
    per_rank = cfg.batch // world
    precond.train()
    while step < total:
        # Learning-rate ramp-up: linear in images seen [2, App. F].
        nimg = step * cfg.batch
        ramp = cfg.lr_rampup_epochs * n
        for group in opt.param_groups:
            group['lr'] = cfg.lr * min(nimg / ramp, 1) if ramp > 0 else cfg.lr

        # One step on the global batch (with replacement: a set smaller than the batch is fine).
        idx = torch.randint(n, (cfg.batch,), generator=g_data)[rank * per_rank:(rank + 1) * per_rank]
        y, c = images[idx.to(device)], None if labels is None else labels[idx.to(device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss = loss_fn(model, y, c, generator=g_noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:                                    # as EDM: a NaN gradient is skipped
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        step += 1

        # EMA: beta = 0.5^(batch / half-life in images), the half-life ramped up early on.
        if cfg.ema_beta is not None:
            beta = cfg.ema_beta
        else:
            half = cfg.ema_halflife_epochs * n
            if cfg.ema_rampup:
                half = min(half, step * cfg.batch * cfg.ema_rampup)
            beta = 0.5 ** (cfg.batch / max(half, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), precond.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
        if progress is not None:
            progress('train', step, total)

        if step in snaps:
            yield step, ema
            # Saved once the caller has scored this snapshot, so an interruption while sampling
            # repeats that snapshot instead of skipping it. Every random stream is saved (dropout
            # draws from torch's global one): a resumed run continues exactly.
            if checkpoint is not None:
                rng = _gather_states(dict(noise=g_noise.get_state(), torch=torch.get_rng_state(),
                                          cuda=torch.cuda.get_rng_state(device)
                                          if device.type == 'cuda' else None))
                if rank == 0:
                    _atomic_save(dict(net=precond.state_dict(), ema=ema.state_dict(),
                                      opt=opt.state_dict(), g_data=g_data.get_state(), rng=rng,
                                      step=step), checkpoint)
    precond.eval()

def _gather_states(state):
    """The RNG states of all ranks (a list), so a resumed DDP run continues every rank's stream."""
    rank, world = dist_info()
    state = {k: None if v is None else v.cpu() for k, v in state.items()}
    if world == 1:
        return [state]
    out = [None] * world
    torch.distributed.all_gather_object(out, state)
    return out

#----------------------------------------------------------------------------
# 9. Measurement and EMM search [1, sec. 3, eq. 5]. The memorization ratio of one training-set size:
# train, and at each snapshot sample with the EMA network, round to the 8-bit grid as the study
# wrote its samples, and score them against the training set; the size's ratio is the highest over
# its snapshots. EMM_eps = max{ |D| : ratio >= 1 - eps }, searched by doubling then bisection.

@dataclass
class EMMConfig:
    """Everything that defines one EMM measurement; the defaults estimate EMM on digits in minutes."""
    data: str = 'digits'
    resolution: int = None          # down-sample to this resolution by area averaging
    classes: int = None             # keep the first C classes
    labels: str = 'none'            # 'none' | 'true' | 'random:C' | 'unique'
    arch: str = 'ddpmpp'
    channels: int = 16
    channel_mult: tuple = (1, 2)
    blocks: int = 1
    attn: tuple = (4,)
    skips: tuple = None
    embedding: str = None
    dropout: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    samples: int = 1000             # generated samples per snapshot (the study: 10k)
    num_steps: int = 18             # Heun steps: 35 network evaluations
    threshold: float = 0.9          # 1 - eps, eps = 0.1
    mem_threshold: float = 1 / 3    # d1/d2 below this: memorized
    optimum: bool = False           # score the closed-form optimum instead of a trained network
    seed: int = 0

    def to_dict(self):
        return json.loads(json.dumps(asdict(self)))        # tuples -> lists, as read back from JSON

def build_network(cfg, shape, label_dim):
    """The U-Net and its preconditioning for images of shape (C, H, W)."""
    C, H, _ = shape
    net = UNet(H, C, C, label_dim=label_dim, model_channels=cfg.channels,
               channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.blocks,
               attn_resolutions=tuple(cfg.attn), dropout=cfg.dropout, arch=cfg.arch,
               embedding=cfg.embedding, skips=cfg.skips)
    return Precond(net, kind=cfg.train.precond)

def training_set(images, labels, n, cfg):
    """The nested subset of size n and its class labels -> (y [n,C,H,W], labels [n] or None, label_dim)."""
    idx = balanced_subset(labels if labels is not None else len(images), n)
    c, label_dim = assign_labels(None if labels is None else labels[idx], cfg.labels, n=n)
    return images[idx], c, label_dim

@torch.no_grad()
def generate(denoise, num, shape, label_dim, seed, device, num_steps=18, batch=1000, progress=None):
    """num samples [num,C,H,W] in [-1,1] from the Heun sampler; rank r draws every world-th one."""
    rank, world = dist_info()
    out = []
    if progress is not None:                                # count network evaluations for a bar
        total, calls, inner = math.ceil(num / batch) * (2 * num_steps - 1), [0], denoise

        def denoise(x, sigma, labels):
            calls[0] += 1
            progress('sample', calls[0], total)
            return inner(x, sigma, labels)
    for start in range(0, num, batch):
        ids = list(range(start, min(start + batch, num)))[rank::world]
        # Each sample's latent (and label) depends only on its index: the same set for any world size.
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7919 + i))
                         for i in ids]) if ids else torch.zeros(0, *shape)
        c = None
        if label_dim:
            k = [torch.randint(label_dim, (1,), generator=torch.Generator().manual_seed(
                 seed * 7919 + i + 10 ** 9)).item() for i in ids]
            c = one_hot(torch.tensor(k, dtype=torch.long), label_dim).to(device)
        x = edm_sampler(denoise, z.to(device), c, num_steps=num_steps) if ids else z.to(device)
        out.append(_gather_rows(x.to(torch.float32), min(batch, num - start)))
    return torch.cat(out)

def _gather_rows(x, total):
    """Re-interleave rows drawn as [rank::world] on each rank into their original order [total, ...]."""
    rank, world = dist_info()
    if world == 1:
        return x
    pad = torch.zeros(math.ceil(total / world), *x.shape[1:], device=x.device, dtype=x.dtype)
    pad[:len(x)] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(parts, pad)
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])[:total]

def score(samples, y, mem_threshold=1/3):
    """Memorization of samples [B,...] against the training set y: ratio, Wilson CI, d1/d2 [B]."""
    B = len(samples)
    if B == 0:
        raise ValueError('score needs at least one sample')
    # Under torchrun each rank searches the nearest neighbours of its rows [rank::world] only; the
    # gathered ratios are the same on every rank, so every rank reaches the same next size.
    rank, world = dist_info()
    ratios = memorization_scores(quantize_uint8(samples[rank::world]), y, mem_threshold)[0]
    ratios = _gather_rows(ratios, B)
    k = int((ratios < mem_threshold).sum())
    return dict(ratio=k / B, ci=list(wilson_interval(k, B))), ratios

def measure(images, labels, n, cfg, device=torch.device('cpu'), workdir=None, progress=None):
    """Memorization of a training set of size n -> (point dict, best samples [B,C,H,W], training set)."""
    y, c, label_dim = training_set(images, labels, n, cfg)
    y = y.to(device)
    shape = tuple(y.shape[1:])
    rank = dist_info()[0]
    # Resume: finished snapshots (and the best samples so far) live beside the training state.
    paths = {k: Path(workdir) / f'n{n}.{k}' for k in ('state.pt', 'snapshots.json', 'best.pt')
             } if workdir is not None else {}
    snapshots = json.loads(paths['snapshots.json'].read_text()) if paths and \
        paths['snapshots.json'].exists() else []
    best_x = torch.load(paths['best.pt']) if paths and paths['best.pt'].exists() else None

    def evaluate(denoise, step):
        nonlocal best_x
        x = generate(denoise, cfg.samples, shape, label_dim, cfg.seed, device, cfg.num_steps,
                     progress=progress)
        s, _ = score(x, y, cfg.mem_threshold)
        if best_x is None or s['ratio'] > max(p['ratio'] for p in snapshots):
            best_x = x.cpu()
            if paths and rank == 0:
                _atomic_save(best_x, paths['best.pt'])
        snapshots.append(dict(step=step, **s))
        if paths and rank == 0:
            atomic_write_text(paths['snapshots.json'], json.dumps(snapshots))

    if cfg.optimum:
        if not snapshots:
            evaluate(OptimalDenoiser(y.double(), None if c is None else c.to(device)), 0)
    else:
        # Initial weights and dropout masks come from torch's global generator: seed it, inside a
        # fork so that the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            torch.manual_seed(cfg.seed)
            precond = build_network(cfg, shape, label_dim).to(device)
            c1h = one_hot(c, label_dim).to(device) if c is not None else None
            done = {s['step'] for s in snapshots}
            for step, ema in train(precond, y, c1h, cfg.train, seed=cfg.seed,
                                   checkpoint=paths.get('state.pt'), progress=progress):
                if step not in done:
                    evaluate(ema, step)
    best = max(snapshots, key=lambda s: s['ratio'])        # the study keeps the highest ratio
    point = dict(size=n, ratio=best['ratio'], ci=best['ci'], best_step=best['step'],
                 snapshots=snapshots)
    return point, best_x, y.cpu()

def atomic_write_text(path, text):
    """Write a text file via a temporary file and a rename: readers never see half of it."""
    tmp = Path(f'{path}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)

def find_emm(ratio_at, lo, hi, threshold=0.9, step=1, tolerance=0.0, known=None):
    """Largest size in [lo, hi] (multiples of step) with ratio_at(n) >= threshold: double, then bisect.

    ratio_at(n) -> float is called at most once per size (sizes in `known`, a dict {n: ratio}, never);
    bisection stops when the bracket is one step wide or narrower than tolerance * its lower end.
    Returns dict(emm, crossing, status, evaluated [(n, ratio), ...] in the order of the search).
    """
    if not (step >= 1 and lo >= step and hi >= lo):
        raise ValueError(f'need 1 <= step <= lo <= hi, got step={step}, lo={lo}, hi={hi}')
    lo, hi = math.ceil(lo / step) * step, hi // step * step
    if lo > hi:
        raise ValueError(f'no size in the range is a multiple of the step {step}')
    known = dict(known or {})
    evaluated = []

    def r(n):
        if n not in known:
            known[n] = float(ratio_at(n))
        evaluated.append((n, known[n]))
        return known[n]

    # Doubling: find a failing size above a passing one.
    passing, failing = None, None
    n = lo
    while True:
        if r(n) >= threshold:
            passing = n
            if n == hi:
                break
            n = min(2 * n, hi)
        else:
            failing = n
            break
    # Bisection between the last passing and the first failing size.
    while passing is not None and failing is not None and failing - passing > step \
            and failing - passing > tolerance * passing:
        mid = (passing + failing) // 2 // step * step
        if mid <= passing:
            break
        if r(mid) >= threshold:
            passing = mid
        else:
            failing = mid
    if passing is None:
        status, crossing = f'below range: the ratio at the smallest size {lo} is under {threshold}', None
    elif failing is None:
        status, crossing = f'above range: every size up to {hi} memorizes (EMM >= {hi})', None
    else:
        rp, rf = known[passing], known[failing]
        crossing = passing + (rp - threshold) / (rp - rf) * (failing - passing)
        status = 'bracketed'
    return dict(emm=passing, crossing=crossing, status=status, evaluated=evaluated)

def summarize(points, threshold=0.9):
    """EMM (largest passing size measured) and the interpolated crossing from a list of point dicts."""
    pts = sorted((p['size'], p['ratio']) for p in points)
    passing = [n for n, r in pts if r >= threshold]
    if not passing:
        return dict(emm=None, crossing=None)
    emm = max(passing)
    above = [(n, r) for n, r in pts if n > emm]
    if not above:
        return dict(emm=emm, crossing=None)
    rp, (nf, rf) = dict(pts)[emm], above[0]
    return dict(emm=emm, crossing=emm + (rp - threshold) / (rp - rf) * (nf - emm))

def versions():
    """Versions of the software a record was made with."""
    import platform
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)

def image_grid(samples, reference, indices, columns=8, scale=None):
    """uint8 [H', W', C] grid: each generated sample beside its nearest training image."""
    pairs = torch.stack([samples, reference[indices]], 1)  # [B, 2, C, H, W]
    B, _, C, H, W = pairs.shape
    scale = scale or max(1, 64 // H)                        # tiny images are enlarged to be seen
    rows = math.ceil(B / columns)
    pairs = torch.cat([pairs, -torch.ones(rows * columns - B, 2, C, H, W)])
    pad = F.pad(to_uint8(pairs).float(), (1, 1, 1, 1), value=255)  # white frame around each image
    grid = pad.reshape(rows, columns, 2, C, H + 2, W + 2).permute(0, 4, 1, 2, 5, 3)
    grid = grid.reshape(rows * (H + 2), columns * 2 * (W + 2), C)
    return grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1).to(torch.uint8)

def write_png(path, image):
    """Write a uint8 [H, W, C] image (C = 1 or 3) as PNG with the standard library alone."""
    import struct
    import zlib
    H, W, C = image.shape
    raw = b''.join(b'\x00' + bytes(row) for row in image.reshape(H, W * C).numpy())

    def chunk(tag, data):
        return (struct.pack('>I', len(data)) + tag + data
                + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))
    png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', W, H, 8, {1: 0, 3: 2}[C],
                                                             0, 0, 0))
           + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))
    tmp = Path(f'{path}.tmp')
    tmp.write_bytes(png)
    os.replace(tmp, path)

def read_record(outdir, config):
    """Points already measured in outdir/results.json for this configuration (a clear error otherwise)."""
    path = Path(outdir) / 'results.json'
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
        saved = record['config']
        points = record['points']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}: not a readable memdiff record ({e}); move it away or choose '
                         'another output folder') from None
    if saved != config:
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise ValueError(f'{path}: holds a run with a different configuration (differs in: '
                         f'{", ".join(diff)}); choose another output folder')
    return points

def write_record(outdir, config, points, threshold, extra=None):
    """results.json (atomically) and results.csv, sizes ascending."""
    points = sorted(points, key=lambda p: p['size'])
    record = dict(**summarize(points, threshold), threshold=threshold, points=points, config=config,
                  versions=versions(), world_size=dist_info()[1], **(extra or {}))
    atomic_write_text(Path(outdir) / 'results.json', json.dumps(record, indent=1))
    lines = ['size,ratio,ci_low,ci_high,best_step,snapshot_steps,snapshot_ratios']
    for p in points:
        steps = ' '.join(str(s['step']) for s in p['snapshots'])
        ratios = ' '.join(f"{s['ratio']:.4f}" for s in p['snapshots'])
        lines.append(f"{p['size']},{p['ratio']:.4f},{p['ci'][0]:.4f},{p['ci'][1]:.4f},"
                     f"{p['best_step']},{steps},{ratios}")
    atomic_write_text(Path(outdir) / 'results.csv', '\n'.join(lines) + '\n')
    return record

def emm_search(cfg, outdir, sizes=None, lo=16, hi=None, step=1, tolerance=0.0,
               device=torch.device('cpu'), progress=None, log=print):
    """Measure the sizes (or search [lo, hi]) and write the record to outdir; resumes from outdir."""
    images, labels = load_dataset(cfg.data, cfg.resolution, cfg.classes)
    hi = len(images) if hi is None else hi
    for n in list(sizes or []) + [lo, hi]:
        if not 1 <= n <= len(images):
            raise ValueError(f'size {n} is impossible: the data set {cfg.data} has {len(images)} '
                             'images')
    if not sizes and lo > hi:
        raise ValueError(f'the smallest size searched ({lo}) is above the largest ({hi})')
    if not cfg.optimum:                                     # an impossible network fails here
        build_network(cfg, tuple(images.shape[1:]), 0 if cfg.labels == 'none' else 2)
    config = cfg.to_dict()
    rank, world = dist_info()
    outdir = Path(outdir)
    points = read_record(outdir, config)                    # before anything is written
    work = outdir / 'work'
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    with _claim(outdir, rank == 0):
        if rank == 0 and not points:                        # the configuration, before any work
            write_record(outdir, config, points, cfg.threshold)
        if world > 1:
            torch.distributed.barrier()
        if points:
            log(f'resuming: {len(points)} size(s) already measured in {outdir / "results.json"}')
        known = {p['size']: p['ratio'] for p in points}

        def ratio_at(n):
            log(f'|D| = {n}: ' + ('sampling the closed-form optimum' if cfg.optimum else
                                  f'training {cfg.train.total_steps(n)} steps'))
            point, x, y = measure(images, labels, n, cfg, device, work, progress)
            points.append(point)
            if rank == 0:
                write_record(outdir, config, points, cfg.threshold)
                x = quantize_uint8(x[:64])
                _, idx = nearest_neighbors(x, y, k=1)
                write_png(outdir / f'samples_n{n}.png', image_grid(x, y, idx[:, 0]))
                (work / f'n{n}.state.pt').unlink(missing_ok=True)  # the record holds the result
            log(f'|D| = {n}: memorization ratio {point["ratio"]:.3f} (95% CI {point["ci"][0]:.3f}'
                f'-{point["ci"][1]:.3f}, best step {point["best_step"]})')
            return point['ratio']

        if sizes:
            for n in sizes:
                if n not in known:
                    known[n] = ratio_at(n)
            status = 'grid'
        else:
            status = find_emm(ratio_at, lo, hi, cfg.threshold, step, tolerance, known)['status']
        # Rewritten at the end too, so a resumed run with nothing left to do still has it whole.
        if rank == 0:
            return write_record(outdir, config, points, cfg.threshold, dict(search=status))
        return dict(**summarize(points, cfg.threshold), points=points, search=status)

def _alive(pid):
    """Whether process pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # alive, but another user's
        return True
    return True

@contextlib.contextmanager
def _claim(outdir, owner=True):
    """Hold outdir/lock while a search writes there: two searches on one record would lose work."""
    path = Path(outdir) / 'lock'
    while owner:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (ValueError, FileNotFoundError):
                pid = 0
            if pid <= 0 or not _alive(pid):
                path.unlink(missing_ok=True)                # the stale lock of a killed run
                continue
            raise ValueError(f'{outdir}: in use by another run (process {pid}); wait for it or '
                             'choose another output folder') from None
    try:
        yield
    finally:
        if owner:
            path.unlink(missing_ok=True)

def init_distributed(device_name='auto'):
    """Join the torchrun process group when launched by torchrun -> (device, rank, world_size)."""
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if device_name.startswith('cuda') else 'gloo'
        torch.distributed.init_process_group(backend)
    rank, world = dist_info()
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"unknown device {device_name!r} (use 'cpu', 'cuda', 'cuda:N' or "
                         "'auto')") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device_name!r} asked for, but this machine has no CUDA GPU')
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"device {device_name!r} is not supported (use 'cpu' or 'cuda')")
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    return device, rank, world

def close_distributed():
    """Leave the torchrun process group, once every rank is done (rank 0 may still be writing)."""
    # A process that exits with the group still open can abort in gloo's threads at shutdown.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
