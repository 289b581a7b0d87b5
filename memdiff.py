"""memdiff: a single-file reference implementation of "On Memorization in Diffusion Models".

Sections, in the order of the science: 1 data (the study's training sets), 2 the DDPM++ / NCSN++
U-Net, 3-4 EDM, VP and VE preconditioning and losses, 5 EDM's Heun sampler, 6 the closed forms D*
and D_G, 7 the memorization metric, 8 the study's training loop, 9 one size's memorization, tau_mem
and the EMM search; an appendix reads the study's network snapshots without running code from them.
Not here: the run around the science (options, records, locks, resume, pictures, sweeps, process
group: run_emm.py), the study's unused augmentation pipeline, FID, and any download.

References:
  [1] X. Gu et al. On Memorization in Diffusion Models. TMLR 2025 (github.com/sail-sg/DiffMemorize).
  [2] T. Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models. NeurIPS 2022
      (github.com/NVlabs/edm).
  [3] Y. Song et al. Score-Based Generative Modeling through SDEs. ICLR 2021 (DDPM++, NCSN++).
  [4] E. B. Wilson. Probable inference, the law of succession, and statistical inference. JASA 1927.
  [5] X. Li, Y. Dai, Q. Qu. Understanding Generalizability of Diffusion Models Requires Rethinking
      the Hidden Gaussian Structure. NeurIPS 2024.
  [6] B. Wang, J. Vastola. The Unreasonable Effectiveness of Gaussian Score Approximation for
      Diffusion Models and its Applications. TMLR 2024.
  [7] T. Bonnaire et al. Why Diffusion Models Don't Memorize: The Role of Implicit Dynamical
      Regularization in Training. NeurIPS 2025.
"""

import collections
import contextlib
import copy
import gzip
import io
import json
import math
import os
import pickle
import random
import re
import sysconfig
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

# The bundled digits: beside this file in a checkout, under <prefix>/share/memdiff when installed.
DATA_DIRS = (Path(__file__).resolve().parent / 'data', Path(sysconfig.get_path('data')) / 'share' / 'memdiff')

#----------------------------------------------------------------------------
# 1. Data: the study's training sets, by the rules of its dataset tools [1, dataset_utils/], no
# augmentation. A file costs about what it holds: headers are read and sizes checked before decoding.

MAX_PIXELS = 4096 * 4096        # per image: far above the study's 32 x 32, far below a bomb's

def _fail(source, problem):
    raise ValueError(f'{source}: {problem}')

@contextlib.contextmanager
def _reading(path, what):
    """Any failure while reading path becomes one ValueError: 'path: not <what> (why)'."""
    try:
        yield
    except Exception as e:                                  # torch, pickle, zip, Pillow raise many
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        _fail(path, f'not {what} ({type(e).__name__}: {e})')

def _free_memory():
    """Bytes this machine can still give: MemAvailable on Linux, its physical memory elsewhere."""
    with contextlib.suppress(OSError, StopIteration), open('/proc/meminfo') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable:'))
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')

def _check_fits(source, shape):
    need, free = 4 * math.prod(shape), _free_memory()       # bytes of the float32 copy [N, C, H, W]
    if need > free:
        _fail(source, f'{" x ".join(map(str, shape))} images need {need / 2**30:.1f} GiB as float32, '
              f'more than the {free / 2**30:.1f} GiB this machine has free')

def _load_npz(path):
    """The study's npz layout: 'images' (NCHW or NHWC, uint8 or float) and optional 'labels'."""
    with open(path, 'rb') as f:                             # numpy would talk of pickles instead
        if f.read(4) != b'PK\x03\x04':
            _fail(path, 'not a valid .npz file (an .npz is a zip of .npy arrays)')
    with _reading(path, 'a valid .npz file'), zipfile.ZipFile(path) as z:
        members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith('.npy')}
        if 'images' not in members:
            _fail(path, f"no 'images' array in the npz (found: {', '.join(members) or 'nothing'})")
        for name in {'images', 'labels'} & set(members):    # headers first: shapes cost nothing
            with z.open(members[name]) as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(f)
            if dtype.hasobject or math.prod(shape) * dtype.itemsize > members[name].file_size:
                _fail(path, f'{name}.npy declares {shape} of {dtype}, which its '
                      f'{members[name].file_size} bytes do not hold as numbers')
            if name == 'images':
                _check_fits(path, shape)
        with np.load(path, allow_pickle=False) as arrays:
            return arrays['images'], (arrays['labels'] if 'labels' in members else None)

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are dicts of bytes, lists and numpy arrays: nothing else is unpickled."""
    def find_class(self, module, name):
        if (module, name) in {('numpy.core.multiarray', '_reconstruct'), ('numpy', 'ndarray'),
                              ('numpy._core.multiarray', '_reconstruct'), ('numpy', 'dtype'),
                              ('_codecs', 'encode')}:         # bytes, as Python 3 writes protocol 2
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refuses {module}.{name}: a batch holds arrays only')

def _load_cifar10(path):
    """CIFAR-10 python version (tar.gz or extracted folder): the five training batches, in order."""
    folder = path / 'cifar-10-batches-py' if (path / 'cifar-10-batches-py').is_dir() else path
    with _reading(path, 'a CIFAR-10 python archive'), contextlib.ExitStack() as stack:
        if path.is_dir():
            files = [stack.enter_context(open(folder / f'data_batch_{i}', 'rb')) for i in range(1, 6)]
        else:
            tar = stack.enter_context(tarfile.open(path, 'r:gz'))
            files = [tar.extractfile(f'cifar-10-batches-py/data_batch_{i}') for i in range(1, 6)]
        batches = [_ArrayUnpickler(f, encoding='latin1').load() for f in files]
        return (np.concatenate([np.asarray(b['data'], np.uint8).reshape(-1, 3, 32, 32) for b in batches]),
                np.concatenate([np.asarray(b['labels']) for b in batches]))

def _load_png_zip(path):
    """EDM-style zip of PNGs (sorted by name, as EDM reads them), labels from its dataset.json."""
    with _reading(path, 'a readable zip of PNGs'), zipfile.ZipFile(path) as z, warnings.catch_warnings():
        warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)  # refused below
        names = sorted(n for n in z.namelist() if n.lower().endswith('.png'))
        if not names:
            _fail(path, 'the zip holds no PNG images')
        sizes = []                                          # 'width x height x bands' of each
        for name in names:                                  # headers only: Pillow decodes lazily
            with z.open(name) as f, PIL.Image.open(f) as im:
                sizes.append(f'{im.width} x {im.height} x {len(im.getbands())}')
            if im.width * im.height > MAX_PIXELS or sizes[-1] != sizes[0]:
                _fail(path, f'{name} is {sizes[-1]}, {names[0]} {sizes[0]}: images must share one size '
                      f'of at most {MAX_PIXELS:,} pixels')
        _check_fits(path, (len(names), len(im.getbands()), im.height, im.width))  # all of one size
        images = [np.array(PIL.Image.open(z.open(name))) for name in names]  # pixels decoded only now
        meta = json.loads(z.read('dataset.json')) if 'dataset.json' in z.namelist() else {}
        table = dict(meta['labels']) if (meta or {}).get('labels') is not None else None
    if table is not None and set(names) - set(table):       # {"labels": [[name, label], ...]}
        _fail(path, 'dataset.json has no label for some images')
    return np.stack(images), None if table is None else np.asarray([table[n] for n in names])

def downsample(images, resolution):
    """Images [N, C, H, W] (numpy or torch) -> [N, C, resolution, resolution] by dataset_tool.py's LANCZOS."""
    H = images.shape[-1]
    if images.shape[-2] != H:
        raise ValueError(f'images must be square to resize, got {H} x {images.shape[-2]}')
    if resolution < 1 or resolution & (resolution - 1) or resolution > H:  # as dataset_tool.py
        raise ValueError(f'resolution {resolution} must be a power of two no larger than the image size {H}')
    if resolution == H:
        return images
    # Band by band, as Pillow filters RGB: uint8 stays uint8 (mode 'L'), floats use 'F', clipped to [-1, 1].
    out = np.stack([[np.asarray(PIL.Image.fromarray(np.ascontiguousarray(band)).resize(
        (resolution, resolution), PIL.Image.LANCZOS)) for band in image] for image in np.asarray(images)])
    out = out if out.dtype == np.uint8 else out.clip(-1, 1)
    return torch.from_numpy(out) if isinstance(images, torch.Tensor) else out

def load_dataset(spec, resolution=None, classes=None):
    """'digits' or a path, first C classes, resized -> (images [N, C, H, W] in [-1, 1], labels [N] | None)."""
    path = Path(spec).expanduser()                          # Path('digits') reads as 'digits'
    if str(spec) == 'digits':                               # the bundled UCI digits, 1 x 8 x 8
        found = [d / 'digits.csv.gz' for d in DATA_DIRS if (d / 'digits.csv.gz').is_file()]
        if not found:
            _fail('digits', 'the bundled digits.csv.gz is missing from the installation')
        with gzip.open(found[0], 'rt') as f:
            table = np.loadtxt(f, delimiter=',', dtype=np.float32)
        images, labels = table[:, :64].reshape(-1, 1, 8, 8) / 8 - 1, table[:, 64]  # 0..16: kept float
    elif not path.exists():
        _fail(spec, "no such file or folder (use 'digits', a .npz, CIFAR-10 python archive "
              "or folder, or an EDM-style .zip of PNGs)")
    elif path.name.lower().endswith('.npz'):
        images, labels = _load_npz(path)
    elif path.name.lower().endswith(('.tar.gz', '.tgz')) or path.is_dir():
        images, labels = _load_cifar10(path)
    elif path.name.lower().endswith('.zip'):
        images, labels = _load_png_zip(path)
    else:
        _fail(spec, 'unknown data format (expected .npz, .tar.gz, a folder or .zip)')
    images = images[:, None] if images.ndim == 3 else images  # [N, H, W]: one channel
    if images.ndim != 4 or images.shape[0] == 0:
        _fail(path, f'images must be N x C x H x W or N x H x W x C with N > 0, got shape {images.shape}')
    if images.shape[3] in (1, 3, 4) and images.shape[1] == images.shape[2] \
            and not (images.shape[1] in (1, 3, 4) and images.shape[2] == images.shape[3]):
        images = images.transpose(0, 3, 1, 2)               # NHWC -> NCHW (square images)
    if images.shape[2] != images.shape[3]:
        _fail(path, f'images must be square (N x C x H x H or N x H x H x C), got shape {images.shape}')
    if images.dtype != np.uint8:                            # uint8 is resized as uint8, as the study
        if not np.issubdtype(images.dtype, np.integer) and not np.issubdtype(images.dtype, np.floating):
            _fail(path, f'images have unsupported dtype {images.dtype}')
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            _fail(path, 'images contain NaN or inf')
        if images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6:
            _fail(path, f'float images must lie in [-1, 1] (or be uint8 0..255), got range '
                  f'[{images.min():.3g}, {images.max():.3g}]')
    if labels is not None:                                  # int64 [N] of whole numbers >= 0
        labels = labels.argmax(1) if labels.ndim == 2 else labels  # one-hot, as EDM's dataset.json
        if labels.ndim != 1 or len(labels) != len(images):
            _fail(path, f'labels must be a vector of {len(images)} entries (one per image), got shape '
                  f'{labels.shape}')
        if not np.issubdtype(labels.dtype, np.number) or not np.isfinite(labels).all() \
                or (labels != np.round(labels)).any() or labels.min() < 0:
            _fail(path, 'labels must be whole numbers >= 0')
        labels = torch.from_numpy(labels.astype(np.int64))
    if classes is not None:                                 # classes 0..C-1 [dataset_diversity.py]
        if labels is None or not 1 <= classes <= int(labels.max()) + 1:
            _fail(spec, f'classes={classes}, but the data set has '
                  f'{0 if labels is None else int(labels.max()) + 1} classes')
        images, labels = images[(labels < classes).numpy()], labels[labels < classes]
    if resolution is not None:
        try:
            images = downsample(images, resolution)
        except ValueError as e:
            _fail(spec, str(e))
    images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 -> u/127.5 - 1 [training_loop.py]
    return (images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images), labels

def balanced_subset(labels, n):
    """Indices [n] of the study's set of size n (labels [N], or N unlabelled: one class), class-sorted."""
    # dataset_size.py, dataset_diversity.py: the first k = n // C images of each class c = 0..C-1
    # in file order, the last taking n - k (C - 1); no seed. Nested while the last share does not shrink.
    N = labels if isinstance(labels, int) else len(labels)
    if not 1 <= n <= N:
        raise ValueError(f'subset size {n} must lie in 1..{N} (the data set size)')
    labels = torch.zeros(N, dtype=torch.int64) if isinstance(labels, int) else torch.as_tensor(labels)
    classes, picks = torch.unique(labels).tolist(), []      # ascending: 0..C-1 for the study's data
    k = n // len(classes)
    for c, share in zip(classes, [k] * (len(classes) - 1) + [n - k * (len(classes) - 1)]):
        members = torch.nonzero(labels == c).flatten()      # file order
        if len(members) < share:
            raise ValueError(f'subset size {n}: class {c} has {len(members)} images, fewer than '
                             f'its share {share} of the first-k rule')
        picks.append(members[:share])
    return torch.cat(picks)

def max_subset_size(labels):
    """The largest n such that balanced_subset(labels, m) exists for every m in 1..n (an int N: N)."""
    if isinstance(labels, int):
        return labels
    counts = torch.unique(torch.as_tensor(labels), return_counts=True)[1].tolist()
    C, first = len(counts), min(counts[:-1], default=len(labels))
    return next((n - 1 for n in range(1, len(labels) + 1)   # the shares of balanced_subset
                 if n // C > first or n - (n // C) * (C - 1) > counts[-1]), len(labels))

def held_out(labels, n, count):
    """Indices of the last ceil(count/C) images of each class (unlabelled: the last count) outside set n."""
    free = torch.ones(labels if isinstance(labels, int) else len(labels), dtype=torch.bool)
    free[balanced_subset(labels, n)] = False                # the same images for every n leaving them
    if isinstance(labels, int):
        return torch.nonzero(free).flatten()[-count:]
    classes = torch.unique(torch.as_tensor(labels))
    k = math.ceil(count / len(classes))
    return torch.cat([torch.nonzero(free & (torch.as_tensor(labels) == c)).flatten()[-k:] for c in classes])

def assign_labels(labels, mode, n=None):
    """Labels of a class-sorted training set -> (int64 [n] or None, label_dim = max label + 1 or 0)."""
    if mode == 'none':
        return None, 0
    if mode == 'true':
        if labels is None:
            raise ValueError("label mode 'true' needs a data set with labels")
        return labels, int(labels.max()) + 1
    n = len(labels) if labels is not None else n
    if mode == 'unique':
        return torch.arange(n), n                           # image i: label i [dataset_unique.py]
    if not re.fullmatch(r'random:[1-9]\d*', str(mode)):
        raise ValueError(f"unknown label mode {mode!r} (expected none, true, random:C with C >= 1 or unique)")
    # dataset_random.py: random.seed(1024), one randint(0, C - 1) per image; a private Random, same draws.
    rng = random.Random(1024)
    out = torch.tensor([rng.randint(0, int(mode[7:]) - 1) for _ in range(n)], dtype=torch.int64)
    return out, int(out.max()) + 1

def to_uint8(x):
    """Images in [-1, 1] -> uint8 pixels, exactly as EDM's generate.py writes its PNGs."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

def quantize_uint8(x):
    """Round images in [-1, 1] to the study's 8-bit grid (x*127.5 + 128, clipped, truncated), same scale."""
    return to_uint8(x).to(x.dtype) / 127.5 - 1

#----------------------------------------------------------------------------
# 2. Network: the DDPM++ / NCSN++ U-Net of Song et al. [3] as re-implemented in EDM [2] and used
# unchanged by the study [1]. Parameter counts are the acceptance test (README, the map).

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
    def __init__(self, mode, taps=(1, 1), pad=None):
        super().__init__()
        f = torch.as_tensor(taps, dtype=torch.float32)
        self.register_buffer('f', f.outer(f) / f.sum().square(), persistent=False)  # sums to 1
        self.mode, self.pad = mode, (len(taps) - 1) // 2 if pad is None else pad
        self.box = tuple(taps) == (1, 1) and self.pad == 0

    def forward(self, x):
        if self.box:                                        # fused kernels for the DDPM++ filter
            return F.avg_pool2d(x, 2) if self.mode == 'down' else F.interpolate(x, scale_factor=2.0)
        C = x.shape[1]
        w = self.f.to(x.dtype).tile([C, 1, 1, 1])           # [C, 1, k, k] depthwise
        if self.mode == 'down':
            return F.conv2d(x, w, groups=C, stride=2, padding=self.pad)
        return F.conv_transpose2d(x, w * 4, groups=C, stride=2, padding=self.pad)

class DownConv(nn.Conv2d):
    """EDM's fused down-sampling 3x3 conv (NCSN++'s residual input path): [B,Cin,H,W] -> [B,Cout,H/2,W/2]."""
    # Conv padded by 1 + (taps-1)//2, stride-2 filter, bias last: conv-then-Resample pads twice.
    def __init__(self, cin, cout, taps=(1, 3, 3, 1)):
        super().__init__(cin, cout, 3, padding=1 + (len(taps) - 1) // 2)
        self.down = Resample('down', taps, pad=0)           # no parameters, no state_dict entries

    def forward(self, x):
        x = F.conv2d(x, self.weight.to(x.dtype), None, padding=self.padding)  # [B,Cout,H+2p-2,..]
        return self.down(x) + self.bias.to(x.dtype)[:, None, None]

class Block(nn.Module):
    """Residual block with the embedding added after the first conv, optional resampling and attention."""
    def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False, dropout=0.0,
                 taps=(1, 1)):
        super().__init__()
        self.in_channels, self.attention = cin, attention
        self.resample = Resample('up' if up else 'down', taps) if up or down else nn.Identity()
        self.norm0 = _group_norm(cin)
        self.conv0 = _init(nn.Conv2d(cin, cout, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, cout))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(cout, cout, 3, padding=1), 1e-5)  # block starts near identity
        self.skip = _init(nn.Conv2d(cin, cout, 1)) if cin != cout or up or down else None
        if attention:
            self.norm2 = _group_norm(cout)
            self.qkv = _init(nn.Conv2d(cout, cout * 3, 1), math.sqrt(0.2))
            self.proj = _init(nn.Conv2d(cout, cout, 1), 1e-5)

    def forward(self, x, emb):
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None]          # embedding broadcast over pixels
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = (h + (self.skip(self.resample(x)) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:                                  # one head, softmax over keys
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])  # [B,1,HW,C]
            x = (self.proj(a[:, 0].transpose(1, 2).reshape(B, C, H, W)) + x) * math.sqrt(0.5)
        return x

class UNet(nn.Module):
    """DDPM++ or NCSN++ U-Net: F(x [B,C,H,W], c_noise [B], labels [B,L] or [B] ints) -> [B,C',H,W]."""
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
        # The constructor's arguments, enough to rebuild this network (save_network, load_network).
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()
                       if k not in ('self', '__class__', 'num_skips')}
        self.label_dim, self.img_resolution, self.in_channels = label_dim, img_resolution, in_channels
        self.out_channels, self.arch, self.embedding, self.skips = out_channels, arch, embedding, skips
        taps = (1, 1) if arch == 'ddpmpp' else (1, 3, 3, 1)
        noise_channels = model_channels * (1 if arch == 'ddpmpp' else 2)  # channel_mult_noise
        emb_channels = model_channels * 4
        block = dict(emb_channels=emb_channels, dropout=dropout, taps=taps)

        # Mapping: c_noise (and label) -> embedding e.
        K = noise_channels // 2
        self.register_buffer('freqs', torch.randn(K) * 16 if embedding == 'fourier'  # ~ N(0, 16^2), fixed
                             else (1 / 10000) ** (torch.arange(K) / (K - 1)))  # k = 0..K-1
        self.map_label = _init(nn.Linear(label_dim, noise_channels)) if label_dim else None
        self.map_layer0 = _init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))

        # Encoder: every output (first conv, each down block, each block) is pushed as a skip.
        self.enc, self.aux = nn.ModuleDict(), nn.ModuleDict()  # aux: NCSN++'s residual input path
        cout, caux, skip_channels = model_channels, in_channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}_conv'] = _init(nn.Conv2d(in_channels, cout, 3, padding=1))
            else:
                self.enc[f'{res}_down'] = Block(cout, cout, down=True, **block)
                if arch == 'ncsnpp':
                    self.aux[f'{res}'] = _init(DownConv(caux, cout, taps))
                    caux = cout
            skip_channels.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}_block{i}'] = Block(cin, cout, attention=res in attn_resolutions, **block)
                skip_channels.append(cout)

        # Decoder: the lowest level opens with two blocks, the others with an up-sampling block.
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

    def label_embedding(self, class_labels, batch):
        """Linear(one_hot * sqrt(L)) of one-hot rows [B, L] or class indices [B] -> [B, noise]."""
        W, b = self.map_label.weight, self.map_label.bias   # [noise, L], [noise]
        if class_labels is None:                            # unconditional call: all-zero label
            return b.expand(batch, -1)
        if class_labels.is_floating_point():
            return self.map_label(class_labels.to(W.dtype) * math.sqrt(self.label_dim))
        # Class indices: gather columns of W, not a [B, L] one-hot (L = |D| = 50,000 unique labels).
        labels = class_labels.reshape(-1).long()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.label_dim):
            raise ValueError(f'class indices must lie in [0, {self.label_dim}), got '
                             f'{int(labels.min())}..{int(labels.max())}')
        return W.t()[labels] * math.sqrt(self.label_dim) + b

    def forward(self, x, noise_labels, class_labels=None):
        # Mapping: [cos, sin] of c_noise * frequencies, halves swapped (sin first), + label, 2-layer MLP.
        c = noise_labels.to(torch.float32).reshape(-1)
        c = c.expand(x.shape[0]) if c.numel() == 1 else c
        arg = c.outer(2 * math.pi * self.freqs if self.embedding == 'fourier' else self.freqs)  # [B, K]
        emb = torch.cat([arg.sin(), arg.cos()], dim=1)      # [B, noise_channels]
        if self.map_label is not None:
            emb = emb + self.label_embedding(class_labels, x.shape[0]).to(emb.dtype)
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
# boundary in float32. Class labels enter as one-hot rows or as class indices (UNet.label_embedding).

# Table 1's constants, one source each: every default below, and the losses' weights, read them.
SIGMA_DATA = 0.5                                # EDM: standard deviation of the data
BETA_D, BETA_MIN, EPSILON_T, M = 19.9, 0.1, 1e-5, 1000  # VP: sigma(t) schedule, t in [eps_t, 1]
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0        # VE: the noise levels it is trained on

def vp_sigma(t, beta_d=BETA_D, beta_min=BETA_MIN):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = t if torch.is_tensor(t) else torch.as_tensor(t)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()

def vp_sigma_inv(sigma, beta_d=BETA_D, beta_min=BETA_MIN):
    """Inverse of vp_sigma: t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma)
    # Not log1p: EDM rounds ln(1 + sigma^2) in float32, and the study's VP networks learned those c_noise.
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

class Precond(nn.Module):
    """D(x [B,C,H,W], sigma [B] or float, labels [B,L] or [B] ints) -> denoised [B,C,H,W] (float32)."""
    def __init__(self, net, kind='edm', sigma_data=SIGMA_DATA, beta_d=BETA_D, beta_min=BETA_MIN,
                 M=M, epsilon_t=EPSILON_T, sigma_min=None, sigma_max=None):
        super().__init__()
        if kind not in ('edm', 'vp', 've'):
            raise ValueError(f"precond kind must be 'edm', 'vp' or 've', got {kind!r}")
        self.net, self.kind, self.sigma_data = net, kind, sigma_data
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.label_dim = getattr(net, 'label_dim', 0)
        # The noise levels the network supports (EDM's sigma_min, sigma_max): the sampler keeps to them.
        default = (VE_SIGMA_MIN, VE_SIGMA_MAX) if kind == 've' else (0.0, math.inf)
        if kind == 'vp':                                    # in float32, as EDM computes them
            default = [float(vp_sigma(torch.tensor(t, device='cpu'), beta_d, beta_min))
                       for t in (epsilon_t, 1.0)]
        self.sigma_min = default[0] if sigma_min is None else float(sigma_min)
        self.sigma_max = default[1] if sigma_max is None else float(sigma_max)

    def loss_constants(self):
        """Keyword arguments of this preconditioning's loss: its sigma_data, beta or sigma range."""
        return dict(edm=dict(sigma_data=self.sigma_data),
                    vp=dict(beta_d=self.beta_d, beta_min=self.beta_min, epsilon_t=self.epsilon_t),
                    ve=dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max))[self.kind]

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at noise level sigma (tensor) [2, Table 1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.kind == 'edm':
            sd = self.sigma_data
            c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)     # sigma_d^2 / (sigma^2 + sigma_d^2)
            c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()  # sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
            c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()      # 1 / sqrt(sigma^2 + sigma_d^2)
            c_noise = sigma.log() / 4                     # ln(sigma) / 4
        elif self.kind == 'vp':
            c_skip, c_out = torch.ones_like(sigma), -sigma  # 1, -sigma
            c_in = 1 / (sigma ** 2 + 1).sqrt()            # 1 / sqrt(sigma^2 + 1)
            c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)  # (M-1) t(sigma)
        else:
            c_skip, c_out, c_in = torch.ones_like(sigma), sigma, torch.ones_like(sigma)  # 1, sigma, 1
            c_noise = (0.5 * sigma).log()                 # ln(sigma / 2)
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        if class_labels is not None and class_labels.is_floating_point():  # indices pass as they are
            class_labels = class_labels.to(torch.float32)
        F_x = self.net(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

#----------------------------------------------------------------------------
# 4. Losses [2, Table 1], per sample: lambda(sigma) * ||D(y + n; sigma) - y||^2 summed over pixels,
# n ~ N(0, sigma^2 I); train() passes the trained Precond's loss_constants, so the two never disagree.

def _randn(shape, like, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

def _weighted_loss(denoise, y, sigma, weight, class_labels, generator):
    n = _randn(y.shape, y, generator) * sigma
    return (weight * (denoise(y + n, sigma, class_labels) - y) ** 2).flatten(1).sum(1)  # [B]

def edm_loss(denoise, y, class_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=SIGMA_DATA,
             generator=None):
    """EDM loss [B]: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2."""
    sigma = (_randn([y.shape[0], 1, 1, 1], y, generator) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    return _weighted_loss(denoise, y, sigma, weight, class_labels, generator)

def vp_loss(denoise, y, class_labels=None, beta_d=BETA_D, beta_min=BETA_MIN, epsilon_t=EPSILON_T,
            generator=None):
    """VP loss [B]: t ~ U(epsilon_t, 1), sigma = sigma(t), lambda = 1 / sigma^2."""
    u = torch.rand([y.shape[0], 1, 1, 1], generator=generator, device=y.device)
    sigma = vp_sigma(1 + u * (epsilon_t - 1), beta_d, beta_min)
    return _weighted_loss(denoise, y, sigma, 1 / sigma ** 2, class_labels, generator)

def ve_loss(denoise, y, class_labels=None, sigma_min=VE_SIGMA_MIN, sigma_max=VE_SIGMA_MAX,
            generator=None):
    """VE loss [B]: sigma log-uniform on [sigma_min, sigma_max], lambda = 1 / sigma^2."""
    u = torch.rand([y.shape[0], 1, 1, 1], generator=generator, device=y.device)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    return _weighted_loss(denoise, y, sigma, 1 / sigma ** 2, class_labels, generator)

LOSSES = {'edm': edm_loss, 'vp': vp_loss, 've': ve_loss}

def sigma_density(precond, sigma, P_mean=-1.2, P_std=1.2):
    """Density of ln sigma [K] with which precond's loss draws its noise levels sigma [K] (float64)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if precond.kind == 'edm':                               # ln sigma ~ N(P_mean, P_std^2)
        return (-((s.log() - P_mean) / P_std) ** 2 / 2).exp() / (P_std * math.sqrt(2 * math.pi))
    if precond.kind == 'vp':                                # t ~ U(eps_t, 1): dt / d ln sigma
        root = (precond.beta_min ** 2 + 2 * precond.beta_d * (1 + s ** 2).log()).sqrt()
        return 2 * s ** 2 / ((1 + s ** 2) * root) / (1 - precond.epsilon_t)
    return torch.full_like(s, 1 / math.log(precond.sigma_max / precond.sigma_min))  # log-uniform

#----------------------------------------------------------------------------
# 5. Sampler: EDM's Heun solver of the probability-flow ODE dx/dt = (x - D(x; t)) / t [2, Alg. 2],
# with the optional churn of its stochastic variant. Any denoiser (x, sigma, labels) -> D(x) fits.

def edm_sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """Noise levels t_0 = sigma_max > ... > t_{n-1} = sigma_min, t_n = 0 [2, eq. 5], float64 [n+1]."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])

def sigma_range(denoise, sigma_min=0.002, sigma_max=80):
    """(sigma_min, sigma_max) clamped to the range the denoiser declares (Precond's), as the study does."""
    return (max(sigma_min, getattr(denoise, 'sigma_min', 0)),
            min(sigma_max, getattr(denoise, 'sigma_max', math.inf)))

@torch.no_grad()
def edm_sampler(denoise, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80,
                rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, generator=None):
    """Heun-sample from unit-variance latents [B,...] -> samples [B,...] in the latents' dtype."""
    sigma_min, sigma_max = sigma_range(denoise, sigma_min, sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn [2, Alg. 2, lines 4-6]: lift the noise to t_hat = (1 + gamma) t_cur; gamma = 0: the ODE.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = _randn(x_cur.shape, x_cur, generator)     # x_cur is float64
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps

        # Euler [lines 7-8]: the slope dx/dt = (x - D(x; t)) / t at t_hat, followed to t_next.
        denoised = denoise(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun [lines 9-11]: the mean of the slopes at both ends, except on the step into t = 0.
        if i < num_steps - 1:
            denoised = denoise(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(latents.dtype)

#----------------------------------------------------------------------------
# 6. Closed-form denoisers of a training set {y_i}, called as Precond is (they drop into edm_sampler):
# the optimum D*(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i [1, eq. 4], which can only
# reproduce training images, and the best affine denoiser D_G [5, 6]; a network that memorizes follows
# D*, one that generalizes D_G. Conditional forms use the sample's class (all images if it has none).

def _class_index(class_labels, labels, B):
    """Class of each sample [B] (-1 where no training image has it); None when unconditional."""
    if class_labels is None or labels is None:
        return None
    c = class_labels.argmax(1) if class_labels.ndim == 2 else class_labels
    c = c.to(labels.device).long().expand(B)
    return c.masked_fill(~torch.isin(c, labels), -1)

class OptimalDenoiser:
    """D*(x [B,...], sigma [B] or float, labels [B,C] one-hot or [B] int) -> [B,...] over a training set."""
    def __init__(self, images, labels=None, chunk=4096):
        self.shape = tuple(images.shape[1:])
        self.y = images.reshape(len(images), -1)            # [N, d], kept in the caller's dtype
        self.half_sq = torch.linalg.vector_norm(self.y, dim=1).square_() / 2  # [N] ||y_i||^2 / 2
        self.log_tiny = math.log(torch.finfo(self.y.dtype).tiny)
        self.labels = None if labels is None else labels.to(self.y.device).long()
        self.chunk = int(chunk)

    def unseen(self, class_labels):
        """Mask [B]: the sample's class has no training image (one-hot rows [B, C] or indices [B])."""
        return _class_index(class_labels, self.labels, len(class_labels)) < 0

    def __call__(self, x, sigma, class_labels=None):
        B = x.shape[0]
        xf = x.reshape(B, -1).to(self.y.dtype)              # [B, d]
        sigma = torch.as_tensor(sigma, dtype=self.y.dtype, device=xf.device).reshape(-1)
        # -||x - y||^2 / 2 sigma^2 = (x.y - ||y||^2/2) / sigma^2 + const(x), which the softmax cancels.
        # At sigma = 0 (nearest neighbour) a tiny floor keeps the logits finite and distinct.
        inv_var = (1 / (sigma ** 2).clamp_min(torch.finfo(self.y.dtype).tiny ** 0.5)).expand(B)[:, None]
        c = _class_index(class_labels, self.labels, B)      # [B] or None; -1: no image
        # Online softmax over chunks of the set: memory O(B x chunk), never O(B x N).
        m = xf.new_full((B, 1), -math.inf)                  # running max of the logits
        s = xf.new_zeros(B, 1)                              # running sum of exp(logit - m)
        acc = xf.new_zeros(B, xf.shape[1])                  # running sum of exp(logit - m) y
        for j in range(0, len(self.y), self.chunk):
            y, hs = self.y[j:j + self.chunk], self.half_sq[j:j + self.chunk]
            logits = torch.mm(xf, y.T).sub_(hs).mul_(inv_var)  # [B, chunk]
            if c is not None:
                other = (c[:, None] != self.labels[None, j:j + self.chunk]) & (c[:, None] >= 0)
                logits.masked_fill_(other, -math.inf)
            m_new = torch.maximum(m, logits.amax(1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0)  # rows with no image of their class yet
            # Weights below the smallest normal float are zero to working precision; flushing them
            # keeps the matmul off the CPU's slow denormal path (20x slower at CIFAR's d = 3072).
            p = F.threshold_(logits.sub_(m_safe), self.log_tiny, -math.inf).exp_()  # [B, chunk]
            rescale = (m - m_safe).exp()
            s.mul_(rescale).add_(p.sum(1, keepdim=True))
            acc.mul_(rescale).addmm_(p, y)
            m = m_new
        return acc.div_(s).reshape(B, *self.shape).to(x.dtype)

def _moments(y):
    """Mean mu [d], eigenvectors U [d, d] and eigenvalues lam [d] of the covariance of y [N, d]."""
    mu = y.mean(0)
    if len(y) == 1:                                         # no spread: D_G is the image itself
        return mu, torch.eye(len(mu), dtype=y.dtype, device=y.device), torch.zeros_like(mu)
    lam, U = torch.linalg.eigh((y - mu).T @ (y - mu) / len(y))  # 1/N: the set's own distribution
    # Eigenvalues at rounding level are no direction of the data: zero, so sigma -> 0 projects.
    return mu, U, torch.where(lam > lam.max().clamp_min(0) * len(lam) * 1e-12, lam, 0)

class GaussianDenoiser:
    """D_G(x [B,...]; sigma) = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu) [5, eq. 5], in float64."""
    def __init__(self, images, labels=None):
        self.shape = tuple(images.shape[1:])
        self.y = images.reshape(len(images), -1).double()   # [N, d]
        self.labels = None if labels is None else labels.to(self.y.device).long()
        self.moments = {}                                   # class (-1: the whole set) -> moments

    def __call__(self, x, sigma, class_labels=None):
        B = x.shape[0]
        xf = x.reshape(B, -1).double()                      # [B, d]
        var = (torch.as_tensor(sigma, dtype=torch.float64, device=xf.device).reshape(-1, 1) ** 2).expand(B, 1)
        c = _class_index(class_labels, self.labels, B)
        c = torch.full((B,), -1, device=xf.device) if c is None else c
        out = torch.empty_like(xf)
        for k in torch.unique(c).tolist():
            if k not in self.moments:                       # each class's once, when first asked
                self.moments[k] = _moments(self.y if k < 0 else self.y[self.labels == k])
            mu, U, lam = self.moments[k]
            rows = c == k
            shrink = torch.where(lam > 0, lam / (lam + var[rows]), 0)  # [b, d]; 0/0 at sigma = 0
            out[rows] = mu + ((xf[rows] - mu) @ U * shrink) @ U.T
        return out.reshape(B, *self.shape).to(x.dtype)

#----------------------------------------------------------------------------
# 7. Memorization metric [1, sec. 3]: a sample x is memorized when ||x - NN_1|| < 1/3 ||x - NN_2||,
# NN_1 and NN_2 its nearest and second-nearest training images (L2 over pixels); the ratio is the
# fraction memorized, with a Wilson interval [4]. The study's mem_ratio.py misses a copy of an image
# stored twice (d1 = d2): memdiff deduplicates the reference set, and score() reports both rules.

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
        # ||x - y||^2 - ||x||^2 = ||y||^2 - 2 x.y: the same order, one matrix product per chunk.
        sq = torch.mm(minus_2x, y.T).add_(torch.linalg.vector_norm(y, dim=1).square_())
        sq, i = sq.topk(min(k, len(y)), dim=1, largest=False)  # [B, k] of this chunk
        if j > 0:                                           # merge with the best so far
            sq, i = torch.cat([best_sq, sq], 1), torch.cat([best_i, i + j], 1)
            sq, pos = sq.topk(min(k, sq.shape[1]), dim=1, largest=False)
            i = i.gather(1, pos)
        best_sq, best_i = sq, i
    # Recompute the k winners exactly: the expansion rounds small distances, and a copy must be at 0.
    dist = torch.linalg.vector_norm(x[:, None] - ref[best_i], dim=2)  # [B, k]
    dist, order = dist.sort(dim=1)
    return dist, best_i.gather(1, order)

def duplicates(reference):
    """Number of reference images [N, ...] that have an exact copy elsewhere in the set."""
    counts = torch.unique(reference.reshape(len(reference), -1), dim=0, return_counts=True)[1]
    return int(counts[counts > 1].sum())

def nearest_distinct(samples, reference, chunk=4096):
    """The two nearest *distinct* reference images -> (d1, d2 [B, 2], their first index [B, 2])."""
    flat = reference.reshape(len(reference), -1)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    if len(unique) < 2:
        raise ValueError('the memorization metric needs at least 2 distinct reference images')
    first = torch.full((len(unique),), len(flat), device=flat.device).scatter_reduce_(
        0, inverse, torch.arange(len(flat), device=flat.device), 'amin')  # first copy of each
    d, i = nearest_neighbors(samples, unique, k=2, chunk=chunk)
    return d, first[i]

def memorization_scores(samples, reference, mem_threshold=1/3, chunk=4096):
    """Per-sample d1/d2 [B] and memorized mask [B] (d1/d2 < mem_threshold) against a reference set."""
    d = nearest_distinct(samples, reference, chunk)[0]
    d1_d2 = d[:, 0] / d[:, 1]                               # d2 > 0: at most one reference at 0
    return d1_d2, d1_d2 < mem_threshold

def memorization_ratio(samples, reference, mem_threshold=1/3, chunk=4096):
    """Fraction of samples [B, ...] memorized with respect to the reference set [N, ...]."""
    return memorization_scores(samples, reference, mem_threshold, chunk)[1].double().mean().item()

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
# Adam (or SGD), a linear learning-rate ramp-up, an EMA of the weights, snapshots of the EMA network.
# Durations are in epochs (passes over |D|: they scale with |D| as in the study) or in optimizer
# steps. Under torchrun the ranks split the global batch and DDP averages their gradients.
REF_IMAGES, REF_BATCH, REF_HALFLIFE = 50_000, 512, 500_000  # the study's |D|, batch, EMA half-life

@dataclass
class TrainConfig:
    """How one network is trained; the defaults are the CPU digits setting (README, Protocol)."""
    precond: str = 'edm'            # 'edm' | 'vp' | 've' (the study's CIFAR-10 runs use 'vp')
    optimizer: str = 'adam'         # 'adam' | 'sgd' (momentum 0.9)
    lr: float = 1e-3
    batch: int = 64                 # global batch, split across ranks
    weight_decay: float = 0.0       # L2 penalty inside the optimizer, as torch's Adam applies it
    train_steps: int = 1500         # duration in optimizer steps, unless epochs is set
    epochs: float = None            # duration in passes over |D| (the study: 40,000)
    lr_rampup: float = 0.0          # linear warm-up in epochs (the study: 200 epochs = |D|/5 kimg)
    ema_mode: str = 'mode1'         # the study's EMA modes 1-4 (ema_beta_at), or 'fixed'
    ema_halflife: float = 10.0      # EMA half-life h in epochs (the study: 10 = 0.5 Mimg at 50k)
    ema_rampup: float = 0.05        # EDM: h is at most this fraction of the images seen so far
    ema_beta: float = 0.99929       # mode4's final beta, or the constant beta of 'fixed'
    whole_kimg: bool = False        # ramp-up and half-life rounded down to whole kimg, as train.py
    snapshots: int = 3              # EMA snapshots scored, the last at the end
    snapshot_spacing: str = 'linear'  # 'linear' | 'log': geometric from ~1% of the steps to the end
    snapshot_images: int = None     # or one every so many images, on EDM's 50k-image ticks

    def total_steps(self, n):
        """Optimizer steps for a training set of n images."""
        return self.train_steps if self.epochs is None else \
            max(1, math.ceil(self.epochs * n / self.batch))

    def snapshot_steps(self, n):
        """Steps (ascending, the last one final) at which the EMA network is evaluated."""
        total = self.total_steps(n)
        S = min(self.snapshots, total)
        if self.snapshot_images:
            # EDM's ticks: tick 0 ends after the first step, each later one after 50k more images;
            # the study snapshots every 50 ticks (2.5M images) and at the end, never at tick 0.
            tick = min(REF_IMAGES, self.snapshot_images)
            every = max(1, round(self.snapshot_images / tick)) * math.ceil(tick / self.batch)
            return sorted(set(range(1 + every, total, every)) | {total})
        if self.snapshot_spacing == 'log':
            # Onsets of memorization span decades of steps: geometric spacing from 1% of the budget
            # (or step 1) to its end; rounding can merge early steps, so there may be fewer than S.
            first = max(1.0, total / 100)
            return sorted({round(first * (total / first) ** (k / (S - 1))) for k in range(S - 1)}
                          | {total})
        if self.snapshot_spacing != 'linear':
            raise ValueError(f"snapshot_spacing must be 'linear' or 'log', got {self.snapshot_spacing!r}")
        return sorted({round(total * k / S) for k in range(1, S + 1)})

    def _images(self, epochs, n):
        """A duration of epochs over n images, in images (whole kimg when the study rounded)."""
        return 1000 * int(epochs * n / 1000) if self.whole_kimg else epochs * n

    def lr_at(self, nimg, n):
        """Learning rate of the step after nimg images: lr min(nimg / ramp-up, 1) [2, App. F]."""
        ramp = self._images(self.lr_rampup, n)
        return self.lr * min(nimg / ramp, 1) if ramp > 0 else self.lr  # no ramp-up: lr from step 1

    def ema_beta_at(self, nimg, n):
        """EMA decay beta after the step at nimg images, as the study's training_loop.py sets it."""
        h = self._images(self.ema_halflife, n)              # half-life in images
        h = min(h, nimg * self.ema_rampup) if self.ema_rampup else h  # 0: no ramp-up
        h = max(h, 1e-8)                                    # h = 0 (the first step): beta = 0
        data_ratio = REF_IMAGES / n
        if self.ema_mode == 'mode1':                        # the half-life as given
            return 0.5 ** (self.batch / h)
        if self.ema_mode == 'mode2':                        # the study's default: after ramp-up
            return 0.5 ** (REF_BATCH / (h * data_ratio))    # 0.5^(512/500k) whatever |D|, batch
        if self.ema_mode == 'mode3':                        # no schedule
            return 0.5 ** (self.batch / REF_HALFLIFE)
        if self.ema_mode == 'mode4':                        # mode2's schedule, ending at ema_beta
            return self.ema_beta / 0.5 ** (self.batch / REF_HALFLIFE) \
                * 0.5 ** (self.batch / (h * data_ratio))
        if self.ema_mode == 'fixed':
            return self.ema_beta
        raise ValueError(f"ema_mode must be mode1..mode4 or 'fixed', got {self.ema_mode!r}")

def dist_info():
    """(rank, world_size) of this process; (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

def data_order(n, seed):
    """The study's data order (window size 0): one seeded permutation of range(n) [n], repeated."""
    # EDM's InfiniteSampler shuffles with numpy's RandomState(seed): the study's seed, its order.
    return torch.from_numpy(np.random.RandomState(seed).permutation(n))

def train(precond, images, labels=None, cfg=TrainConfig(), seed=0, resume=None, progress=None):
    """Train precond on images [n,C,H,W] (classes [n]) -> yields (step, EMA copy, state) per snapshot;
    state() is what `resume` needs to go on exactly: call it at once, under torchrun on every rank."""
    rank, world = dist_info()
    if cfg.batch % world:
        raise ValueError(f'batch {cfg.batch} is not divisible by the {world} processes')
    device, n = images.device, len(images)
    total, snaps = cfg.total_steps(n), cfg.snapshot_steps(n)
    ema = copy.deepcopy(precond).eval().requires_grad_(False)
    params = [p for p in precond.parameters() if p.requires_grad]
    # The fused kernels do the update of every tensor in one pass: 5x faster than a loop on a CPU.
    if cfg.optimizer == 'adam':
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=cfg.weight_decay, fused=True)
    elif cfg.optimizer == 'sgd':
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, fused=True)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    order = data_order(n, seed).to(device)
    g_noise = torch.Generator(device=device).manual_seed(seed * 1000 + 1 + rank)
    step = 0 if resume is None else resume['step']
    if resume is not None:
        for module, key in ((precond, 'net'), (ema, 'ema'), (opt, 'opt')):
            module.load_state_dict(resume[key])
        rng = resume['rng'][rank] if rank < len(resume['rng']) else resume['rng'][0]
        g_noise.set_state(rng['noise'])
        torch.set_rng_state(rng['torch'])                   # dropout draws from the global stream
        if rng['cuda'] is not None and device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'], device)
    model = precond if world == 1 else torch.nn.parallel.DistributedDataParallel(
        precond, device_ids=[device.index] if device.type == 'cuda' else None)
    ema_params, net_params = list(ema.parameters()), list(precond.parameters())
    bad = torch.full((), -1, device=device)             # first step with a non-finite loss

    def state():                                            # at the step just taken
        rng = dict(noise=g_noise.get_state(), torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)
        rngs = [rng] * world                                # every rank's, so each stream goes on
        if world > 1:                                       # get_state() tensors are on the CPU
            torch.distributed.all_gather_object(rngs, rng)
        return dict(net=precond.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    rng=rngs, step=step)

    precond.train()
    while step < total:
        nimg = step * cfg.batch                             # images seen before this step
        for group in opt.param_groups:
            group['lr'] = cfg.lr_at(nimg, n)

        # The global batch is the next `batch` entries of the repeated permutation, so every image
        # is seen once per epoch; rank r takes entries r, r + world, ... as EDM's sampler deals them.
        idx = order[(nimg + torch.arange(rank, cfg.batch, world, device=device)) % n]
        y, c = images[idx], None if labels is None else labels[idx]
        loss = LOSSES[precond.kind](model, y, c, generator=g_noise, **precond.loss_constants()).mean()
        # Checked at the snapshots only: reading it every step would stall a GPU's queue.
        bad = torch.where((bad < 0) & ~loss.detach().isfinite(), step + 1, bad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:                                    # as EDM: nan -> 0, +-inf -> +-1e5
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()

        # EMA: ema = beta ema + (1 - beta) net, one fused pass over every tensor.
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - cfg.ema_beta_at(nimg, n))
        step += 1
        if progress is not None:
            progress('train', step, total)
        if step in snaps:
            if bad >= 0:
                raise ValueError(f'training diverged: the loss is NaN or infinite at step '
                                 f'{int(bad)} of {total} (|D| = {n}); lower the learning rate')
            yield step, ema, state
    precond.eval()

#----------------------------------------------------------------------------
# 9. Measurement and EMM search [1, sec. 3, eq. 5]. A size's memorization ratio is the highest over
# the snapshots of the EMA network's samples (the study's seeds, rounded to 8 bits as it saved them)
# scored against the training set; EMM_eps = max{|D| : E[R] >= 1 - eps}, by doubling and bisection.

@dataclass
class EMMConfig:
    """Everything that defines one EMM measurement; the defaults estimate EMM on digits in minutes."""
    data: str = 'digits'
    resolution: int = None          # down-sample to this resolution (Pillow's LANCZOS on uint8)
    classes: int = None             # keep the first C classes
    labels: str = 'none'            # 'none' | 'true' | 'random:C' | 'unique'
    arch: str = 'ddpmpp'            # 'ddpmpp' | 'ncsnpp' U-Net, or 'optimum': the closed form D*
    model_channels: int = 16
    channel_mult: tuple = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple = None  # None: half the image resolution, the study's placement
    skips: tuple = None             # one 0/1 per encoder skip; None: all on
    embedding: str = None           # 'positional' | 'fourier'; None: the arch's own
    dropout: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    samples: int = 1000             # samples per snapshot, seeds 0..samples-1 (the study: 10k)
    num_steps: int = 18             # Heun steps: 35 network evaluations
    threshold: float = 0.9          # 1 - eps, eps = 0.1: the EMM's memorization ratio
    mem_threshold: float = 1 / 3    # d1/d2 below this: a sample is memorized
    seed: int = 0                   # training: initial weights, data order, noise
    optimum = property(lambda self: self.arch == 'optimum')  # not a field: D* itself, no training

    def to_dict(self):
        return json.loads(json.dumps(asdict(self)))        # tuples -> lists, as read back from JSON

def build_network(cfg, shape, label_dim):
    """The U-Net and its preconditioning for images of shape (C, H, W)."""
    C, H, _ = shape
    attn = (H // 2,) if cfg.attn_resolutions is None else tuple(cfg.attn_resolutions)
    return Precond(UNet(H, C, C, label_dim=label_dim, model_channels=cfg.model_channels,
                        channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.num_blocks,
                        attn_resolutions=attn, dropout=cfg.dropout, arch=cfg.arch,
                        embedding=cfg.embedding, skips=cfg.skips), kind=cfg.train.precond)

def training_set(images, labels, n, cfg):
    """The study's training set of size n -> (y [n,C,H,W] class-sorted, labels [n] or None, label_dim)."""
    idx = balanced_subset(labels if labels is not None else len(images), n)
    c, label_dim = assign_labels(None if labels is None else labels[idx], cfg.labels, n=n)
    return images[idx], c, label_dim

def study_latents(seeds, shape, label_dim, device):
    """Latents [B,C,H,W] and classes [B] (or None) of the study's seeds, drawn as its sampler did."""
    z = torch.empty(len(seeds), *shape, device=device)
    c = torch.empty(len(seeds), dtype=torch.long, device=device)
    for k, s in enumerate(seeds):
        g = torch.Generator(device).manual_seed(int(s) % (1 << 32))  # one per seed, on the device
        z[k] = torch.randn(shape, generator=g, device=device)
        if label_dim:                                       # then a conditional network's class
            c[k] = torch.randint(label_dim, size=[], generator=g, device=device)
    return z, c if label_dim else None

@torch.no_grad()
def generate(denoise, num, shape, label_dim, device, num_steps=18, batch=1000, progress=None):
    """Samples [num,C,H,W] of seeds 0..num-1 and their classes [num] (or None); ranks split each batch."""
    rank, world = dist_info()
    sigma_min, sigma_max = sigma_range(denoise)             # the counting wrapper declares none
    if progress is not None:                                # count network evaluations for a bar
        total, calls, inner = math.ceil(num / batch) * (2 * num_steps - 1), [0], denoise
        def denoise(x, sigma, labels):
            calls[0] += 1
            progress('sample', calls[0], total)
            return inner(x, sigma, labels)
    xs, cs = [], []
    for start in range(0, num, batch):
        seeds = range(start, min(start + batch, num))
        z, c = study_latents(seeds[rank::world], shape, label_dim, device)
        x = edm_sampler(denoise, z, c, num_steps, sigma_min, sigma_max) if len(z) else z
        xs.append(_gather_rows(x.to(torch.float32), len(seeds)))
        cs.append(c if c is None else _gather_rows(c, len(seeds)))
    return torch.cat(xs), (torch.cat(cs) if label_dim else None)

def _gather_rows(x, total):             # rows [rank::world] of every rank -> [total, ...], in order
    rank, world = dist_info()
    if world == 1:
        return x
    pad = torch.zeros(math.ceil(total / world), *x.shape[1:], device=x.device, dtype=x.dtype)
    pad[:len(x)] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(parts, pad)
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])[:total]

def score(samples, y, mem_threshold=1/3):
    """Samples [B,...] vs the training set y -> (dict(ratio, ci, ...), dict(d1, d2 [B], index [B, 2]))."""
    B = len(samples)
    if B == 0 or not torch.isfinite(samples).all():
        raise ValueError(f'{int((~torch.isfinite(samples.flatten(1))).any(1).sum())} of {B} '
                         'samples are NaN or infinite' if B else 'score needs at least one sample')
    rank, world = dist_info()               # each rank searches its rows; gathered, all ranks agree
    x = quantize_uint8(samples[rank::world])
    d, index = (_gather_rows(t, B) for t in nearest_distinct(x, y))
    k = int((d[:, 0] / d[:, 1] < mem_threshold).sum())
    out = dict(ratio=k / B, ci=list(wilson_interval(k, B)))
    if count := duplicates(y):              # copies in y: the study's ratio too (no deduplication)
        d_study = _gather_rows(nearest_neighbors(x, y, k=2)[0], B)
        out.update(ratio_study=int((d_study[:, 0] / d_study[:, 1] < mem_threshold).sum()) / B,
                   duplicates=count)
    return out, dict(d1=d[:, 0], d2=d[:, 1], index=index)

# Probes [5, 6]: does the network denoise as D* or as D_G? Its share s = d(net, D_G) / (d(net, D*) +
# d(net, D_G)) on noisy training images is 1 as D* (back to the image), 0 as D_G. Held-out images are
# kept apart: at small sigma D* jumps to a training image, a c_out ~ sigma net stays near its input.
PROBE_IMAGES, PROBE_SIGMAS, PROBE_SEED = 64, 16, 0  # images a side (about), noise levels, seed

def probe_set(images, labels, n, cfg):
    """Probe inputs of size n -> dict(y [P,C,H,W], held [P], labels [P] or None, noise [P,K,C,H,W])."""
    y, c, label_dim = training_set(images, labels, n, cfg)
    mine = torch.linspace(0, n - 1, min(n, PROBE_IMAGES)).round().long()  # spread over the classes
    other = held_out(labels if labels is not None else len(images), n, PROBE_IMAGES)  # last of a class
    g = torch.Generator().manual_seed(PROBE_SEED)           # each slot keeps its noise across sizes
    noise = torch.randn([2, max(PROBE_IMAGES, len(other)), PROBE_SIGMAS, *images.shape[1:]],
                        generator=g)
    if label_dim:                                           # held out: true class, else the sampler's
        drawn = torch.randint(label_dim, [len(other)], generator=g)
        c = torch.cat([c[mine], labels[other] if cfg.labels == 'true' else drawn])
    return dict(y=torch.cat([y[mine], images[other]]), labels=c if label_dim else None,
                held=torch.arange(len(mine) + len(other)) >= len(mine),
                noise=torch.cat([noise[0, :len(mine)], noise[1, :len(other)]]))

@torch.no_grad()
def probe(precond, probes, optimum, gaussian, sigma_min=0.002, sigma_max=80):
    """precond vs D* and D_G on probes -> dict(loss_train/held, dist_opt/gauss, share, gap, probe)."""
    lo, hi = sigma_range(precond, sigma_min, sigma_max)
    sigma = torch.logspace(math.log10(lo), math.log10(hi), PROBE_SIGMAS, dtype=torch.float64)
    y, held, c = probes['y'], probes['held'], probes['labels']
    rows = collections.defaultdict(list)                    # per level; NaN: an empty side
    for k, s in enumerate(sigma.tolist()):
        x = y + s * probes['noise'][:, k]                   # [P, C, H, W]
        D = precond(x, s, c).double()
        lam = (s ** 2 + precond.sigma_data ** 2) / (s * precond.sigma_data) ** 2 \
            if precond.kind == 'edm' else 1 / s ** 2        # lambda(sigma) [2, Table 1]
        loss = lam * (D - y.double()).flatten(1).square().sum(1)               # [P]
        d_opt = (D - optimum(x.double(), s, c)).flatten(1).square().mean(1)    # [P]
        d_gauss = (D - gaussian(x.double(), s, c)).flatten(1).square().mean(1)  # [P]
        for names, mask in ((('loss_train', 'dist_opt', 'dist_gauss'), ~held),
                            (('loss_held', 'dist_opt_held', 'dist_gauss_held'), held)):
            for name, e in zip(names, (loss, d_opt, d_gauss)):
                v = e[mask].mean().item() if mask.any() else math.nan
                rows[name].append(v if name.startswith('loss') else math.sqrt(v))  # RMS per pixel
    p, out = sigma_density(precond, sigma).tolist(), {}     # the loss's density of the levels
    for k in ('loss_train', 'loss_held', 'dist_opt', 'dist_gauss'):     # p-weighted, finite levels
        pairs = [(w, v) for w, v in zip(p, rows[k]) if math.isfinite(v)]
        out[k] = sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) if pairs else None
    total = out['dist_opt'] + out['dist_gauss']
    out.update(share=out['dist_gauss'] / total if total > 0 else None,
               gap=None if out['loss_held'] is None else out['loss_held'] - out['loss_train'])
    rows = {k: [v if math.isfinite(v) else None for v in vs] for k, vs in rows.items()}
    return dict(out, probe=dict(sigma=sigma.tolist(), weight=[w / sum(p) for w in p], **rows))

def measure(images, labels, n, cfg, device=torch.device('cpu'), resume=None, progress=None):
    """Memorization at size n -> yields (snapshot, dict(samples, classes, d1, d2, index), train's state)."""
    y, c, label_dim = training_set(images, labels, n, cfg)
    y, c, shape = y.to(device), None if c is None else c.to(device), tuple(y.shape[1:])
    optimum, gaussian = OptimalDenoiser(y.double(), c), GaussianDenoiser(y, c)
    probes = {k: v if v is None else v.to(device) for k, v in probe_set(images, labels, n, cfg).items()}
    runs = [(0, optimum, None)]                             # the optimum: one snapshot, no state
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [], enabled=not cfg.optimum):
        if not cfg.optimum:
            torch.manual_seed(cfg.seed)                     # weights, dropout; the fork restores it
            precond = build_network(cfg, shape, label_dim).to(device)
            runs = train(precond, y, c, cfg.train, cfg.seed, resume, progress)
        for step, denoise, state in runs:
            x, cx = generate(denoise, cfg.samples, shape, label_dim, device, cfg.num_steps,
                             progress=progress)
            try:
                summary, scores = score(x, y, cfg.mem_threshold)
            except ValueError as e:
                raise ValueError(f'sampling diverged at step {step} (|D| = {n}): {e}') from None
            snapshot = dict(step=step, **summary)
            if not cfg.optimum:
                snapshot.update(probe(denoise, probes, optimum, gaussian))
            elif c is not None:                             # samples of a class with no image
                snapshot['unconditional'] = int(optimum.unseen(cx).sum())
            yield snapshot, dict(samples=x, classes=cx, **scores), state

def best_point(n, snapshots, threshold=0.9):
    """A size's point: the best snapshot's ratio, ci, share, gap (the study keeps the highest), tau_mem."""
    best = max(snapshots, key=lambda s: s['ratio'])
    tau, bracket = tau_mem(snapshots, threshold)
    return dict(size=n, ratio=best['ratio'], ci=best['ci'], best_step=best['step'], tau_mem=tau,
                tau_bracket=bracket, snapshots=snapshots,
                **{k: best[k] for k in ('ratio_study', 'duplicates', 'share', 'gap') if k in best})

def find_emm(ratio_at, lo, hi, threshold=0.9, step=1, tolerance=0.0, known=None):
    """EMM_eps = max{N : E[R] >= 1 - eps} [1, eq. 5] (threshold = 1 - eps) over the multiples of step
    in [lo, hi] -> dict(emm, crossing, status, evaluated [(n, ratio)] in search order)."""
    if not (step >= 1 and lo >= step and hi >= lo):
        raise ValueError(f'need 1 <= step <= lo <= hi, got step={step}, lo={lo}, hi={hi}')
    lo, hi = math.ceil(lo / step) * step, hi // step * step
    if lo > hi:
        raise ValueError(f'no size in the range is a multiple of the step {step}')
    known, evaluated = dict(known or {}), []
    def passes(n):                                          # ratio_at(n) at most once, not if known
        known[n] = known[n] if n in known else float(ratio_at(n))
        evaluated.append((n, known[n]))
        return known[n] >= threshold
    passing, failing, n = None, None, lo
    while failing is None and passing != hi:                # doubling: a failing size above a pass
        passing, failing = (n, None) if passes(n) else (passing, n)
        n = min(2 * n, hi)
    while passing is not None and failing is not None and failing - passing > tolerance * passing \
            and (mid := (passing + failing) // 2 // step * step) > passing:  # bisection, to one step
        passing, failing = (mid, failing) if passes(mid) else (passing, mid)
    status = (f'below range: the ratio at the smallest size {lo} is under {threshold}' if passing is None
              else f'above range: every size up to {hi} memorizes (EMM >= {hi})' if failing is None
              else 'bracketed')
    points = [dict(size=n, ratio=r) for n, r in evaluated]  # summarize's bracket: the search's last
    return dict(summarize(points, threshold), status=status, evaluated=evaluated)

def summarize(points, threshold=0.9):
    """EMM (largest passing size) of points [{size, ratio}] and its crossing, linear to the next size."""
    pts = sorted((p['size'], p['ratio']) for p in points)
    k = max((k for k, (_, r) in enumerate(pts) if r >= threshold), default=None)
    if k is None or k + 1 == len(pts):
        return dict(emm=None if k is None else pts[k][0], crossing=None)
    (n0, r0), (n1, r1) = pts[k], pts[k + 1]
    return dict(emm=n0, crossing=n0 + (r0 - threshold) / (r0 - r1) * (n1 - n0))

def tau_mem(snapshots, threshold=0.9):
    """Onset of memorization [7] (~ |D|) of snapshots [{step, ratio}] -> (tau, [step_below, step_above])."""
    pts = sorted((s['step'], s['ratio']) for s in snapshots)
    k = next((k for k, (_, ratio) in enumerate(pts) if ratio >= threshold), None)
    if k is None:                                           # never reaches the threshold
        return None, None
    step, ratio = pts[k]
    if k == 0 or pts[k - 1][0] <= 0:                        # no snapshot below it: an upper bound
        return float(step), [0, step]
    s0, r0 = pts[k - 1]                                     # r0 < threshold <= ratio: log-linear
    tau = math.exp(math.log(s0) + (threshold - r0) / (ratio - r0) * (math.log(step) - math.log(s0)))
    return min(max(tau, s0), step), [s0, step]              # exp(log) may round past a bracket end

def fit_power_law(sizes, taus):
    """Least squares of log tau = log a + b log |D| -> (a, b); needs two distinct sizes."""
    b, log_a = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(taus, float)), 1)
    return float(math.exp(log_a)), float(b)

def tau_law(points, samples, threshold=0.9, replicates=1000, generator=None):
    """Fit tau_mem = a |D|^b over the sizes with a bracketed tau_mem -> dict(exponent, ci, ...) or None."""
    def onset(snapshots):                                   # tau_mem if bracketed from below
        tau, bracket = tau_mem(snapshots, threshold)
        return tau if tau is not None and bracket[0] > 0 else None
    def law(points):                                        # (a, b), or None under two sizes
        onsets = [(p['size'], tau) for p in points if (tau := onset(p['snapshots']))]
        return fit_power_law(*zip(*onsets)) if len({n for n, _ in onsets}) >= 2 else None
    kept = [p for p in points if onset(p['snapshots'])]
    if (fit := law(kept)) is None:
        return None
    replicas = [[] for _ in range(replicates)]              # ci: ratios ~ Binomial(samples, ratio)
    for p in kept:
        ratio = torch.tensor([s['ratio'] for s in p['snapshots']], dtype=torch.float64)
        k = torch.binomial(torch.full((replicates, len(ratio)), float(samples), dtype=torch.float64),
                           ratio.expand(replicates, -1), generator=generator)      # [R, S]
        for replica, redrawn in zip(replicas, (k / samples).tolist()):
            replica.append(dict(size=p['size'], snapshots=[
                dict(step=s['step'], ratio=q) for s, q in zip(p['snapshots'], redrawn)]))
    bs = [f[1] for f in map(law, replicas) if f is not None]
    return dict(exponent=fit[1], ci=[float(np.quantile(bs, q)) for q in (0.025, 0.975)] if bs else None,
                prefactor=fit[0], sizes=[p['size'] for p in kept], replicates=len(bs))

#----------------------------------------------------------------------------
# Appendix: reading the study's snapshots. The study's training loop (EDM's) pickles dict(ema=
# VPPrecond | VEPrecond | EDMPrecond holding a SongUNet as .model, ...) to network-snapshot-*.pkl;
# EDM's classes pickle their module's source, which unpickling execs (torch_utils/persistence.py).
# memdiff runs none of it: it reads each module as a record and rebuilds its own UNet and Precond.

class _Record:
    """A pickled module as data: its class name and state (__dict__: _parameters, _modules, ...)."""
    class_name = 'torch container'                      # ModuleDict & co.: no __init__, then BUILD

    def __init__(self, meta):                           # EDM's _reconstruct_persistent_obj(meta)
        self.class_name, self.state = meta['class_name'], meta['state']  # module_src stays unread

    def __setstate__(self, state):                      # pickle's BUILD
        self.state = state

# Everything a network-snapshot pickle may name, found by pickling EDM's and DiffMemorize's objects
# (torch 2.x, numpy 1 and 2); each maps to a function that builds data, never to one that runs code.
_SNAPSHOT_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _Record,
    **{('torch.nn.modules.container', c): _Record for c in ('ModuleDict', 'ModuleList', 'Sequential')},
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'):              # torch's own runs a full torch.load
        lambda data: torch.load(io.BytesIO(data), map_location='cpu', weights_only=True),
    ('collections', 'OrderedDict'): collections.OrderedDict, ('numpy', 'dtype'): np.dtype,
    # numpy's scalar(dtype, bytes), e.g. EDM's skip_scale = np.sqrt(0.5); object dtypes are refused
    **{(m, 'scalar'): lambda dtype, data: np.frombuffer(data, dtype, count=1)[0].item()
       for m in ('numpy.core.multiarray', 'numpy._core.multiarray')},
    ('dnnlib.util', 'EasyDict'): dict,                  # EDM's attribute dict, read as a dict
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset}

class _SnapshotUnpickler(pickle.Unpickler):
    """Unpickles data only: a name outside _SNAPSHOT_GLOBALS is refused before anything runs."""
    def find_class(self, module, name):
        if (module, name) not in _SNAPSHOT_GLOBALS:
            raise ValueError(f'refuses to load {module}.{name}: a network snapshot holds tensors '
                             'and constructor arguments; memdiff runs no code from a file')
        return _SNAPSHOT_GLOBALS[module, name]

def _record_tensors(record, prefix=''):
    """name -> tensor of every parameter and buffer under a record, named as in state_dict()."""
    out = {prefix + name: t for group in ('_parameters', '_buffers')
           for name, t in record.state.get(group, {}).items() if t is not None}
    for name, child in record.state.get('_modules', {}).items():
        if child is not None:                           # _unet_from_state checks what is found
            out.update(_record_tensors(child, f'{prefix}{name}.'))
    return out

def _edm_names(state):
    """EDM SongUNet state_dict -> the same tensors under memdiff's UNet names (no copy)."""
    out = {}
    for name, t in state.items():
        parts = name.split('.')
        if parts[-1] == 'resample_filter' or parts[0] == 'map_augment':
            continue                                    # fixed by the taps / unused at sampling
        if parts[0] == 'map_noise':                     # FourierEmbedding's frequencies
            parts = parts[1:]
        elif parts[0] in ('enc', 'dec') and (m := re.fullmatch(r'(\d+)x\1_(\w+)', parts[1])):
            res, layer = m.groups()                     # other names stay, refused as unexpected
            head = {'aux_residual': ['aux', res], 'aux_norm': ['out_norm'],
                    'aux_conv': ['out_conv']}.get(layer, [parts[0], f'{res}_{layer}'])
            parts = head + parts[2:]
        out['.'.join(parts)] = t
    return out

def _unet_from_state(config, state, edm=False):
    """memdiff's UNet(**config) holding the tensors of state (EDM's q, k, v layout when edm)."""
    # Arguments bounded, a first build on the meta device (no allocation), every stored tensor
    # matched to it, shape and storage: a file makes memdiff allocate about what it holds.
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ValueError('the network is stored without its U-Net arguments and tensors')
    for key, bound in dict(img_resolution=4096, in_channels=64, out_channels=64, label_dim=10 ** 6,
                           model_channels=4096, num_blocks=64).items():
        value = config.get(key, 0)
        if not isinstance(value, int) or not 0 <= value <= bound:
            raise ValueError(f'U-Net argument {key}={value!r} is not a whole number in 0..{bound}')
    mult = config.get('channel_mult', ())
    if not isinstance(mult, (list, tuple)) or len(mult) > 16 \
            or not all(isinstance(m, int) and 1 <= m <= 64 for m in mult):
        raise ValueError(f'U-Net argument channel_mult={mult!r} is not 1..16 whole numbers in 1..64')
    with torch.device('meta'):
        own = UNet(**config).state_dict()
    optional = {'freqs'} if edm and config.get('embedding') == 'positional' else set()  # computed
    missing, unexpected = set(own) - set(state) - optional, set(state) - set(own)
    wrong = sorted(k for k in set(state) & set(own) if not isinstance(state[k], torch.Tensor)
                   or state[k].shape != own[k].shape or state[k].dtype.is_complex
                   or state[k].numel() * state[k].element_size() > state[k].untyped_storage().nbytes())
    if missing or unexpected or wrong:
        raise ValueError(f"the stored network does not fit memdiff's U-Net: missing {sorted(missing)}, "
                         f'unexpected {sorted(unexpected)}, wrong shape, type or storage {wrong}')
    if edm:                                             # EDM: channel 3c + j holds q/k/v (j) of c
        state = {k: t.reshape(t.shape[0] // 3, 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
                 if k.split('.')[-2:-1] == ['qkv'] else t for k, t in state.items()}
    with torch.random.fork_rng(devices=[]):             # the initial weights are overwritten
        net = UNet(**config)
    net.load_state_dict(state, strict=False)
    return net

# The two SongUNets of the study (EDM's train.py --arch ddpmpp and ncsnpp), and nothing in between.
_SONG_UNET_ARCHS = {
    'ddpmpp': dict(encoder_type='standard', decoder_type='standard', resample_filter=[1, 1],
                   channel_mult_noise=1, channel_mult_emb=4),
    'ncsnpp': dict(encoder_type='residual', decoder_type='standard', resample_filter=[1, 3, 3, 1],
                   channel_mult_noise=2, channel_mult_emb=4)}
# EDM's SongUNet arguments and defaults: first those memdiff's UNet shares (the first three have
# none); DiffMemorize adds skip_connections; augment_dim and label_dropout act only in training.
_SONG_UNET_SHARED = dict(img_resolution=None, in_channels=None, out_channels=None, label_dim=0,
                         model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4,
                         attn_resolutions=[16], dropout=0.10)
_SONG_UNET = dict(**_SONG_UNET_SHARED, augment_dim=0, label_dropout=0, embedding_type='positional',
                  skip_connections=None, **_SONG_UNET_ARCHS['ddpmpp'])
# EDM's preconditionings: memdiff's kind and the arguments it reads (memdiff's defaults are EDM's);
# the others (img_resolution, label_dim, model_type, ...) went to the SongUNet held as .model.
_PRECONDS = {'VPPrecond': ('vp', ('beta_d', 'beta_min', 'M', 'epsilon_t')),
             'VEPrecond': ('ve', ('sigma_min', 'sigma_max')),
             'EDMPrecond': ('edm', ('sigma_min', 'sigma_max', 'sigma_data'))}

def _precond_from_edm(data, path):
    """Precond(UNet) from an unpickled snapshot: its 'ema', an EDM VP/VE/EDMPrecond of a SongUNet."""
    ema = data.get('ema') if isinstance(data, dict) else data
    name = getattr(ema, 'class_name', type(ema).__name__)
    if name not in _PRECONDS:
        raise ValueError(f"holds a {name}, not the study's network-snapshot-*.pkl (a dict whose "
                         "'ema' entry is a VPPrecond, VEPrecond or EDMPrecond)")
    kind, names = _PRECONDS[name]
    kw, model = ema.state['_init_kwargs'], ema.state['_modules'].get('model')
    if getattr(model, 'class_name', None) != 'SongUNet':
        raise ValueError(f"the network inside {name} is a {getattr(model, 'class_name', model)}; "
                         'memdiff implements SongUNet (DDPM++ / NCSN++) only')
    if ema.state.get('_init_args') or model.state.get('_init_args'):  # EDM passes keywords only
        raise ValueError(f'{name} or its SongUNet was stored with positional arguments')
    if kw.get('use_fp16'):                              # EDM runs it in float16 on a GPU
        warnings.warn(f'{path}: stored with use_fp16=True; memdiff evaluates it in float32')
    song = {**_SONG_UNET, **model.state['_init_kwargs']}
    if unknown := sorted(song.keys() - _SONG_UNET.keys()):
        raise ValueError(f'SongUNet has arguments memdiff does not implement: {unknown}')
    found = {k: song[k] for k in _SONG_UNET_ARCHS['ddpmpp']}
    arch = next((a for a, settings in _SONG_UNET_ARCHS.items() if settings == found), None)
    if arch is None:
        raise ValueError(f'SongUNet with {found}: memdiff implements {_SONG_UNET_ARCHS}')
    config = {k: song[k] for k in _SONG_UNET_SHARED}
    config.update(arch=arch, embedding=song['embedding_type'], skips=song['skip_connections'] or None)
    unet = _unet_from_state(config, _edm_names(_record_tensors(model)), edm=True)
    return Precond(unet, kind, **{k: kw[k] for k in names if k in kw})

_PRECOND_SETTINGS = ('kind', 'sigma_data', 'beta_d', 'beta_min', 'M', 'epsilon_t', 'sigma_min', 'sigma_max')

def save_network(precond, path):
    """Write a Precond(UNet) to path as a memdiff network file (settings and tensors, no code)."""
    torch.save(dict(format='memdiff-network', version=1, unet=precond.net.config,
                    precond={k: getattr(precond, k) for k in _PRECOND_SETTINGS},
                    state={k: t.cpu() for k, t in precond.net.state_dict().items()}), path)

def _read_network(path):
    """Precond(UNet) from a save_network file, read with torch.load(weights_only=True)."""
    data = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(data, dict) or data.get('format') != 'memdiff-network':
        raise ValueError('is a torch file but not a memdiff network (save_network writes those)')
    settings = data.get('precond')
    if not isinstance(settings, dict) or set(settings) - set(_PRECOND_SETTINGS) \
            or not all(isinstance(v, (int, float, str)) for v in settings.values()):
        raise ValueError(f'precond settings must be a dict of {", ".join(_PRECOND_SETTINGS)}')
    return Precond(_unet_from_state(data.get('unet'), data.get('state')), **settings)

def load_network(path):
    """The study's network-snapshot-*.pkl (its 'ema') or a save_network file -> Precond(UNet), eval."""
    path = Path(path)                                   # every failure: one ValueError naming it
    if not path.is_file():
        _fail(path, 'no such file')
    try:
        with open(path, 'rb') as f:
            if f.read(4) == b'PK\x03\x04':              # a zip: torch.save's format, memdiff's file
                precond = _read_network(path)
            else:                                       # a pickle: the study's snapshot
                f.seek(0)
                precond = _precond_from_edm(_SnapshotUnpickler(f).load(), path)
    except ValueError as e:                             # the readers' own refusals, located
        _fail(path, e)
    except Exception as e:                              # torch, pickle and the allocator raise many
        _fail(path, f'not a readable network file ({type(e).__name__}: {e})')
    return precond.eval().requires_grad_(False)
