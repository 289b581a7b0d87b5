"""load_network: the study's (EDM's) network-snapshot pickles, read as data, and memdiff's own files.

The tests cannot import EDM: they write pickles in its format with a stand-in for
torch_utils.persistence built here. Each EDM object pickles as
_reconstruct_persistent_obj(meta), meta holding the source code of its module (here: code that
would create a marker file), its class name and its state (__dict__ with _parameters, _buffers,
_modules, _init_args, _init_kwargs), exactly the layout EDM writes.
"""

import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memdiff

SEEDS = st.integers(0, 2**31 - 1)
SIGMAS = [0.002, 0.05, 0.5, 2.0, 20.0, 80.0]


#----------------------------------------------------------------------------
# A stand-in for EDM's torch_utils.persistence and the snapshot format of its training loop.

def fake_persistence(marker):
    """Modules torch_utils and torch_utils.persistence whose reconstructor runs module_src, as EDM's does."""
    package = types.ModuleType('torch_utils')
    module = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        exec(meta['module_src'], {})                        # what EDM does with the pickled source
        raise AssertionError('the real reconstructor was called')

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    module.MODULE_SRC = f'import pathlib\npathlib.Path({str(marker)!r}).touch()\n'
    package.persistence = module
    return {'torch_utils': package, 'torch_utils.persistence': module}


class Persistent(torch.nn.Module):
    """A module that pickles as EDM's persistent classes do: reconstructor(meta), state = __dict__."""
    def __init__(self, class_name, init_kwargs=None, params=None, buffers=None, children=None, **attrs):
        super().__init__()
        self.class_name = class_name
        for k, v in (params or {}).items():                 # a stride-0 view is kept as it is
            v = v if 0 in v.stride() else v.clone()
            self.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))
        for k, v in (buffers or {}).items():
            self.register_buffer(k, v.clone())
        for k, v in (children or {}).items():
            self.add_module(k, v)
        self._init_args, self._init_kwargs = (), dict(init_kwargs or {})
        self.__dict__.update(attrs)

    def __reduce__(self):
        persistence = sys.modules['torch_utils.persistence']
        state = {k: v for k, v in self.__dict__.items() if k != 'class_name'}
        meta = dict(type='class', version=6, module_src=persistence.MODULE_SRC,
                    class_name=self.class_name, state=state)
        return persistence._reconstruct_persistent_obj, (meta,)


def edm_tree(tensors):
    """Nested Persistent modules (torch ModuleDicts for enc and dec) from dotted EDM names."""
    tree = {}
    for name, t in tensors.items():
        *path, leaf = name.split('.')
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = t

    def build(name, node):
        children = {k: build(k, v) for k, v in node.items() if isinstance(v, dict)}
        params = {k: v for k, v in node.items() if not isinstance(v, dict) and k != 'resample_filter'}
        buffers = {k: v for k, v in node.items() if k in ('resample_filter', 'freqs')}
        params = {k: v for k, v in params.items() if k not in buffers}
        if name in ('enc', 'dec'):                          # plain torch containers in EDM
            return torch.nn.ModuleDict(children)
        return Persistent('Conv2d', params=params, buffers=buffers, children=children,
                          skip_scale=np.sqrt(0.5))          # a numpy scalar, as EDM stores one
    return {k: build(k, v) for k, v in tree.items()}


def edm_state(net):
    """memdiff UNet state -> EDM SongUNet names and its interleaved q, k, v (written independently)."""
    R = net.img_resolution
    out = {}
    for name, t in net.state_dict().items():
        head, _, rest = name.partition('.')
        if name == 'freqs':
            if net.embedding == 'positional':               # EDM computes these, stores nothing
                continue
            name = 'map_noise.freqs'
        elif head in ('enc', 'dec'):
            block, _, rest = rest.partition('.')
            res, _, layer = block.partition('_')
            name = f'{head}.{res}x{res}_{layer}.{rest}'
        elif head == 'aux':
            res, _, rest = rest.partition('.')
            name = f'enc.{res}x{res}_aux_residual.{rest}'
        elif head in ('out_norm', 'out_conv'):
            name = f'dec.{R}x{R}_aux_{head[4:]}.{rest}'
        if '.qkv.' in name:                                 # memdiff [q; k; v] -> EDM (c, j) pairs
            C = t.shape[0] // 3
            t = torch.stack(list(t.reshape(3, C, *t.shape[1:]).unbind(0)), dim=1).reshape(t.shape)
        out[name] = t
    if net.arch == 'ncsnpp':                                # EDM keeps its filter as a buffer
        f = torch.tensor([1., 3., 3., 1.])
        out[f'enc.{R // 2}x{R // 2}_aux_residual.resample_filter'] = (f.outer(f) / 64)[None, None]
    return out


PRECOND_CLASSES = {'vp': 'VPPrecond', 've': 'VEPrecond', 'edm': 'EDMPrecond'}


def song_unet_kwargs(net, skips=False):
    """SongUNet's constructor arguments for a memdiff UNet, as EDM's train.py passes them."""
    c = net.config
    kw = dict(img_resolution=c['img_resolution'], in_channels=c['in_channels'],
              out_channels=c['out_channels'], label_dim=c['label_dim'],
              model_channels=c['model_channels'], channel_mult=list(c['channel_mult']),
              num_blocks=c['num_blocks'], attn_resolutions=list(c['attn_resolutions']),
              dropout=c['dropout'], embedding_type=c['embedding'])
    if c['arch'] == 'ddpmpp':
        kw.update(encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
                  resample_filter=[1, 1])
    else:
        kw.update(encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
                  resample_filter=[1, 3, 3, 1])
    if skips:                                               # DiffMemorize's extra argument
        kw['skip_connections'] = list(c['skips'])
    return kw


def write_study_snapshot(path, precond, modules, precond_kwargs=None, unet_kwargs=None,
                         unet_class='SongUNet', skips=False, state=None):
    """Pickle dict(ema=..., loss_fn=..., augment_pipe=None, dataset_kwargs=...) as EDM's loop does
    (the network's tensors, or `state`: EDM's names -> tensors)."""
    net = precond.net
    kw = dict(song_unet_kwargs(net, skips), **(unet_kwargs or {}))
    model = Persistent(unet_class, kw, children=edm_tree(edm_state(net) if state is None else state),
                       label_dropout=0, map_augment=None)
    model_kwargs = {k: v for k, v in kw.items()
                    if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
    pkw = dict(img_resolution=net.img_resolution, img_channels=net.in_channels,
               label_dim=net.label_dim, use_fp16=False, model_type='SongUNet', **model_kwargs)
    pkw.update(precond_kwargs or {})
    ema = Persistent(PRECOND_CLASSES[precond.kind], pkw, children={'model': model})
    loss_fn = Persistent('VPLoss', dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5))
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                    path='cifar10-1k.zip', use_labels=bool(net.label_dim),
                                    xflip=False, cache=True))
    with pytest.MonkeyPatch.context() as mp:
        for name, module in modules.items():
            mp.setitem(sys.modules, name, module)
        with open(path, 'wb') as f:
            pickle.dump(data, f)


def perturbed_precond(kind, seed, **unet):
    """A memdiff Precond(UNet) whose every parameter is seeded noise (no layer near zero)."""
    kw = dict(img_resolution=8, in_channels=2, out_channels=2, model_channels=16,
              channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.1)
    kw.update(unet)
    net = memdiff.UNet(**kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return memdiff.Precond(net, kind).eval()


def assert_same_denoiser(loaded, reference, seed, label_dim):
    """D(x; sigma) of both agree at the sampler's noise levels, labels as one-hot rows and indices."""
    g = torch.Generator().manual_seed(seed)
    n = len(SIGMAS)
    sigma = torch.tensor(SIGMAS)
    x = torch.randn(n, 2, 8, 8, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    idx = torch.randint(max(label_dim, 1), (n,), generator=g) if label_dim else None
    rows = torch.nn.functional.one_hot(idx, label_dim).float() if label_dim else None
    with torch.no_grad():
        expected = reference(x, sigma, rows)
        torch.testing.assert_close(loaded(x, sigma, rows), expected, rtol=1e-5, atol=1e-5)
        if label_dim:
            torch.testing.assert_close(loaded(x, sigma, idx), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def persistence(tmp_path):
    """The stand-in persistence modules and the marker file their module_src would create."""
    marker = tmp_path / 'module_src_ran'
    return fake_persistence(marker), marker


#----------------------------------------------------------------------------
# The study's snapshots.

CASES = {
    'vp-ddpmpp': dict(kind='vp'),
    've-ncsnpp': dict(kind='ve', arch='ncsnpp'),
    'edm-ddpmpp-labels': dict(kind='edm', label_dim=3),
    'vp-ncsnpp-positional-labels-no-attn': dict(kind='vp', arch='ncsnpp', embedding='positional',
                                         label_dim=4, attn_resolutions=()),
    'vp-ddpmpp-skips-off': dict(kind='vp', skips=[1, 0, 1, 0], skip_kwarg=True),
}


@pytest.mark.parametrize('case', list(CASES))
def test_study_snapshot_loads_as_the_same_denoiser(case, persistence, tmp_path):
    """A snapshot in EDM's format loads, without EDM, as a Precond(UNet) giving the same D(x; sigma)."""
    modules, marker = persistence
    kw = dict(CASES[case])
    kind, skip_kwarg = kw.pop('kind'), kw.pop('skip_kwarg', False)
    reference = perturbed_precond(kind, 0, **kw)
    path = tmp_path / 'network-snapshot-000000.pkl'
    write_study_snapshot(path, reference, modules, skips=skip_kwarg)
    assert 'torch_utils.persistence' not in sys.modules       # the study's code is not importable
    loaded = memdiff.load_network(path)
    assert isinstance(loaded, memdiff.Precond) and isinstance(loaded.net, memdiff.UNet)
    assert not loaded.training and loaded.kind == kind
    assert loaded.net.config == reference.net.config
    assert_same_denoiser(loaded, reference, 1, reference.net.label_dim)
    assert not marker.exists()


@pytest.mark.parametrize('kind, precond_kwargs, expected', [
    ('ve', {}, (0.02, 100.0)),
    ('ve', dict(sigma_min=0.01, sigma_max=50), (0.01, 50.0)),
    ('edm', {}, (0.0, math.inf)),
    ('vp', {}, None),
    ('vp', dict(epsilon_t=1e-3, beta_d=10.0), None),
])
def test_study_snapshot_keeps_its_precond_settings(kind, precond_kwargs, expected, persistence,
                                                   tmp_path):
    """sigma_min/sigma_max and beta_d, beta_min, epsilon_t come from the stored constructor arguments."""
    modules, _ = persistence
    path = tmp_path / 'network-snapshot.pkl'
    write_study_snapshot(path, perturbed_precond(kind, 0), modules, precond_kwargs)
    loaded = memdiff.load_network(path)
    if kind == 'vp':                                           # [sigma(epsilon_t), sigma(1)]
        beta_d, eps = precond_kwargs.get('beta_d', 19.9), precond_kwargs.get('epsilon_t', 1e-5)
        sigma = lambda t: math.sqrt(math.expm1(0.5 * beta_d * t * t + 0.1 * t))
        expected = (sigma(eps), sigma(1.0))
        assert loaded.beta_d == beta_d and loaded.epsilon_t == eps
        # EDM computes sigma(epsilon_t) in float32, where exp(1e-6) - 1 rounds to 9.5e-7.
        assert math.isclose(loaded.sigma_min, expected[0], rel_tol=3e-2)
        assert math.isclose(loaded.sigma_max, expected[1], rel_tol=1e-5)
    else:
        assert (loaded.sigma_min, loaded.sigma_max) == expected
    if kind == 'vp' and precond_kwargs:                       # the stored beta_d reaches c_noise
        reference = perturbed_precond('vp', 0)
        reference.beta_d = 10.0
        assert_same_denoiser(loaded, reference, 2, 0)


def test_pickle_that_runs_a_command_is_refused(tmp_path, hostile):
    """A pickle naming os.system is refused with a clear ValueError and the command never runs."""
    exploit, marker = hostile
    path = tmp_path / 'network-snapshot-evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=exploit)))
    with pytest.raises(ValueError, match=r'refuses to load (posix|nt|os)\.system'):
        memdiff.load_network(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())                            # the control: plain pickle runs it
    assert marker.exists()


def test_module_src_is_never_executed(persistence, tmp_path, monkeypatch):
    """Even with a torch_utils.persistence importable that would exec module_src, nothing is run."""
    modules, marker = persistence
    path = tmp_path / 'network-snapshot.pkl'
    write_study_snapshot(path, perturbed_precond('vp', 0), modules)
    for name, module in modules.items():                       # the trap is armed while loading
        monkeypatch.setitem(sys.modules, name, module)
    memdiff.load_network(path)
    assert not marker.exists()
    with pytest.raises(AssertionError, match='real reconstructor'):
        pickle.loads(path.read_bytes())                        # the control: plain pickle execs it
    assert marker.exists()


def test_nested_storage_bytes_are_read_as_weights_only(tmp_path, hostile):
    """A storage whose nested bytes hold a pickled command is refused (torch.load weights_only)."""
    exploit, marker = hostile
    inner = pickle.dumps(exploit)

    class Storage:                                             # pickles like a torch storage
        def __reduce__(self):
            return torch.storage._load_from_bytes, (inner,)

    path = tmp_path / 'network-snapshot.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Storage())))
    with pytest.raises(ValueError, match=str(path.name)):
        memdiff.load_network(path)
    assert not marker.exists()


@pytest.mark.parametrize('change, message', [
    (dict(unet_kwargs=dict(encoder_type='skip')), 'encoder_type'),
    (dict(unet_kwargs=dict(decoder_type='skip')), 'decoder_type'),
    (dict(unet_kwargs=dict(resample_filter=[1, 3, 3, 1])), 'resample_filter'),
    (dict(unet_kwargs=dict(channel_mult_emb=2)), 'channel_mult_emb'),
    (dict(unet_kwargs=dict(num_heads=4)), 'num_heads'),
    (dict(unet_class='DhariwalUNet'), 'DhariwalUNet'),
])
def test_configurations_memdiff_does_not_implement_are_refused(change, message, persistence,
                                                               tmp_path):
    """A snapshot of an architecture memdiff lacks raises ValueError naming the file and the setting."""
    modules, _ = persistence
    path = tmp_path / 'network-snapshot.pkl'
    write_study_snapshot(path, perturbed_precond('vp', 0), modules, **change)
    with pytest.raises(ValueError, match=message) as info:
        memdiff.load_network(path)
    assert str(path) in str(info.value)


def test_fp16_snapshot_warns_and_runs_in_float32(persistence, tmp_path):
    """use_fp16=True loads with a warning; memdiff evaluates it in float32."""
    modules, _ = persistence
    path = tmp_path / 'network-snapshot.pkl'
    reference = perturbed_precond('vp', 0)
    write_study_snapshot(path, reference, modules, dict(use_fp16=True))
    with pytest.warns(UserWarning, match='use_fp16'):
        loaded = memdiff.load_network(path)
    assert_same_denoiser(loaded, reference, 0, 0)


@pytest.mark.parametrize('content', [b'', b'not a pickle', pickle.dumps(dict(net=1)),
                                     pickle.dumps([1, 2, 3])])
def test_files_that_are_not_snapshots_raise_value_error(content, tmp_path):
    """Empty, foreign or ema-less files raise ValueError naming the file."""
    path = tmp_path / 'network-snapshot.pkl'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='network-snapshot.pkl'):
        memdiff.load_network(path)
    with pytest.raises(ValueError, match='no such file'):
        memdiff.load_network(tmp_path / 'missing.pkl')


#----------------------------------------------------------------------------
# memdiff's own network files.

@settings(max_examples=5)
@given(seed=SEEDS, kind=st.sampled_from(['edm', 'vp', 've']), arch=st.sampled_from(['ddpmpp', 'ncsnpp']))
def test_memdiff_network_file_round_trips(seed, kind, arch, tmp_path_factory):
    """save_network then load_network gives the same denoiser, settings and sigma range."""
    reference = perturbed_precond(kind, seed, arch=arch, label_dim=2, skips=[1, 1, 0, 1])
    path = tmp_path_factory.mktemp('net') / 'network.pt'
    memdiff.save_network(reference, path)
    loaded = memdiff.load_network(path)
    assert loaded.net.config == reference.net.config and not loaded.training
    assert (loaded.sigma_min, loaded.sigma_max) == (reference.sigma_min, reference.sigma_max)
    assert_same_denoiser(loaded, reference, seed, 2)


def test_memdiff_network_file_is_read_weights_only(tmp_path, hostile):
    """A torch file that would run a command when unpickled is refused and the command never runs."""
    exploit, marker = hostile
    path = tmp_path / 'network.pt'
    torch.save(dict(format='memdiff-network', payload=exploit), path)
    with pytest.raises(ValueError, match='network.pt'):
        memdiff.load_network(path)
    assert not marker.exists()
    torch.save(dict(weights=torch.zeros(2)), path)             # readable, but not a network
    with pytest.raises(ValueError, match='not a memdiff network'):
        memdiff.load_network(path)


def test_score_mode_scores_a_folder_of_study_snapshots_like_mem_ratio(persistence, tmp_path):
    """run_emm.py --score DIR: every snapshot but the first (as mem_ratio.py), seeds 0..N-1, scored
    against the training set; score.json holds the best."""
    from click.testing import CliRunner
    import run_emm
    modules, marker = persistence
    folder = tmp_path / 'run'
    folder.mkdir()
    for k, seed in ((0, 0), (500, 1), (1000, 2)):
        precond = perturbed_precond('vp', seed, in_channels=1, out_channels=1)
        write_study_snapshot(folder / f'network-snapshot-{k:06d}.pkl', precond, modules)
    out = tmp_path / 'out'
    result = CliRunner().invoke(run_emm.main, ['--score', str(folder), '--sizes', '32', '--samples',
                                               '12', '--outdir', str(out),
                                               '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    record = json.loads((out / 'score.json').read_text())
    names = [r['snapshot'] for r in record['snapshots']]
    assert names == ['network-snapshot-000500.pkl', 'network-snapshot-001000.pkl']
    y = memdiff.training_set(*memdiff.load_dataset('digits'), 32, memdiff.EMMConfig())[0]
    for row in record['snapshots']:
        net = memdiff.load_network(folder / row['snapshot'])
        x, _ = memdiff.generate(net, 12, (1, 8, 8), 0, torch.device('cpu'))
        assert row['ratio'] == memdiff.score(x, y)[0]['ratio']
    assert record['best']['ratio'] == max(r['ratio'] for r in record['snapshots'])
    assert not marker.exists()


#----------------------------------------------------------------------------
# Files that declare more than they hold: refused before anything is allocated, in one line.

def peak_growth(fn):
    """(fn's outcome or the exception it raised, growth of the process's peak resident memory in
    MiB, seconds), the peak reset first through /proc/self/clear_refs (Linux)."""
    import time
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pytest.skip('needs /proc/self/clear_refs to reset the peak resident memory')

    def vmhwm():
        with open('/proc/self/status') as f:
            return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024
    start, t = vmhwm(), time.perf_counter()
    try:
        outcome = fn()
    except Exception as e:                                  # the refusal itself is checked by the caller
        outcome = e
    return outcome, vmhwm() - start, time.perf_counter() - t


@pytest.mark.parametrize('model_channels', [512, 16384])
def test_a_snapshot_declaring_a_huge_network_is_refused_without_allocating_it(model_channels,
                                                                             persistence, tmp_path):
    """SongUNet arguments that declare a network far larger than the file's tensors are refused
    with a ValueError naming the file, in well under a second and under 100 MiB of growth."""
    modules, marker = persistence
    path = tmp_path / 'network-snapshot.pkl'
    write_study_snapshot(path, perturbed_precond('vp', 0), modules,
                         unet_kwargs=dict(model_channels=model_channels))
    outcome, mib, seconds = peak_growth(lambda: memdiff.load_network(path))
    assert isinstance(outcome, ValueError) and str(path) in str(outcome), outcome
    assert mib < 100 and seconds < 1.0, (mib, seconds)
    assert not marker.exists()


def test_tensors_claiming_more_than_their_storage_are_refused_before_any_copy(persistence, tmp_path):
    """Stride-0 views of one float each that claim the shapes of a 768-channel network (1.7 GB as
    tensors; the file is kilobytes) are refused before the q, k, v reshape would copy them."""
    modules, _ = persistence
    with torch.device('meta'):                              # shapes only: nothing is allocated
        claimed = memdiff.Precond(memdiff.UNet(8, 2, 2, model_channels=768, channel_mult=(1, 2),
                                               num_blocks=1, attn_resolutions=(4,)), 'vp')
        shapes = edm_state(claimed.net)
    state = {k: torch.zeros(1).as_strided(t.shape, [0] * t.dim()) for k, t in shapes.items()}
    path = tmp_path / 'network-snapshot.pkl'
    write_study_snapshot(path, claimed, modules, state=state)
    assert path.stat().st_size < 2_000_000
    outcome, mib, seconds = peak_growth(lambda: memdiff.load_network(path))
    assert isinstance(outcome, ValueError) and 'storage' in str(outcome), outcome
    assert mib < 100 and seconds < 1.0, (mib, seconds)


@pytest.mark.parametrize('change, words', [
    (dict(unet='not a dict'), 'U-Net'),
    (dict(unet=dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=10 ** 6)),
     'model_channels'),
    (dict(unet=dict(img_resolution=8, in_channels=1, out_channels=1, channel_mult=[1] * 40)),
     'channel_mult'),
    (dict(precond=dict(kind='vp', colour='red')), 'precond'),
    (dict(precond='vp'), 'precond'),
    (dict(state=[1, 2]), 'U-Net'),
])
def test_a_malformed_memdiff_network_file_is_one_value_error(change, words, tmp_path):
    """Wrong-typed or oversized settings in memdiff's own file are a ValueError naming the file and
    the setting (no TypeError or RuntimeError), quickly and without large allocations."""
    reference = perturbed_precond('vp', 0)
    path = tmp_path / 'network.pt'
    memdiff.save_network(reference, path)
    data = torch.load(path, weights_only=True)
    data.update(change)
    torch.save(data, path)
    outcome, mib, seconds = peak_growth(lambda: memdiff.load_network(path))
    assert isinstance(outcome, ValueError), outcome
    assert str(path) in str(outcome) and words.lower() in str(outcome).lower(), outcome
    assert mib < 100 and seconds < 1.0, (mib, seconds)


def test_a_snapshot_whose_bytes_end_like_a_zip_loads_as_a_snapshot(persistence, tmp_path):
    """The formats are told apart by their leading bytes: a genuine pickle followed by a zip's end
    record (which zipfile.is_zipfile would take for a zip) loads as the study's snapshot."""
    import io
    import zipfile
    modules, _ = persistence
    path = tmp_path / 'network-snapshot.pkl'
    reference = perturbed_precond('ve', 3)
    write_study_snapshot(path, reference, modules)
    tail = io.BytesIO()
    with zipfile.ZipFile(tail, 'w') as z:
        z.writestr('x', b'y')
    path.write_bytes(path.read_bytes() + tail.getvalue())
    assert zipfile.is_zipfile(path)
    assert_same_denoiser(memdiff.load_network(path), reference, 0, 0)


@pytest.mark.parametrize('kind, precond_kwargs, clamp', [
    ('ve', {}, (0.02, 80.0)),
    ('edm', dict(sigma_min=0.01, sigma_max=40.0), (0.01, 40.0)),
])
def test_score_mode_samples_the_networks_clamped_range_image_for_image(kind, precond_kwargs, clamp,
                                                                       persistence, tmp_path,
                                                                       monkeypatch):
    """--score with progress bars shown: a VE network and an EDM network of range [0.01, 40] give
    the uint8 samples of edm_sampler called directly with the study's clamp, and --save-samples
    writes them with their d1, d2 and nearest training images."""
    import run_emm
    from click.testing import CliRunner
    modules, _ = persistence
    folder = tmp_path / 'run'
    folder.mkdir()
    precond = perturbed_precond(kind, 5, in_channels=1, out_channels=1, **({'arch': 'ncsnpp'}
                                                                           if kind == 've' else {}))
    precond.sigma_min, precond.sigma_max = (precond_kwargs.get('sigma_min', precond.sigma_min),
                                            precond_kwargs.get('sigma_max', precond.sigma_max))
    write_study_snapshot(folder / 'network-snapshot-000000.pkl', precond, modules, precond_kwargs)
    monkeypatch.setattr(run_emm, 'progress_bar', run_emm.Progress)   # as on a terminal
    out = tmp_path / 'out'
    result = CliRunner().invoke(run_emm.main, ['--score', str(folder / 'network-snapshot-000000.pkl'),
                                               '--sizes', '32', '--samples', '10', '--save-samples',
                                               '--outdir', str(out), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    saved = np.load(out / 'samples_network-snapshot-000000.npz')
    z, _ = memdiff.study_latents(range(10), (1, 8, 8), 0, torch.device('cpu'))
    direct = memdiff.edm_sampler(lambda *a: precond(*a), z, sigma_min=clamp[0], sigma_max=clamp[1])
    assert np.array_equal(saved['samples'], memdiff.to_uint8(direct).permute(0, 2, 3, 1).numpy())
    y = memdiff.training_set(*memdiff.load_dataset('digits'), 32, memdiff.EMMConfig())[0]
    q = memdiff.quantize_uint8(direct).flatten(1)
    d = torch.cdist(q.double(), y.flatten(1).double())
    assert np.allclose(saved['d1'], d.gather(1, torch.from_numpy(saved['nearest'][:, :1]))[:, 0],
                       rtol=1e-5)
    assert np.allclose(saved['d1_d2'], saved['d1'] / saved['d2'])
