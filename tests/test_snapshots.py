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
        for k, v in (params or {}).items():
            self.register_parameter(k, torch.nn.Parameter(v.clone(), requires_grad=False))
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
                         unet_class='SongUNet', skips=False):
    """Pickle dict(ema=..., loss_fn=..., augment_pipe=None, dataset_kwargs=...) as EDM's loop does."""
    net = precond.net
    kw = dict(song_unet_kwargs(net, skips), **(unet_kwargs or {}))
    model = Persistent(unet_class, kw, children=edm_tree(edm_state(net)),
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
                                               '12', '--sampler-steps', '3', '--outdir', str(out),
                                               '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    record = json.loads((out / 'score.json').read_text())
    names = [r['snapshot'] for r in record['snapshots']]
    assert names == ['network-snapshot-000500.pkl', 'network-snapshot-001000.pkl']
    y = memdiff.training_set(*memdiff.load_dataset('digits'), 32, memdiff.EMMConfig())[0]
    for row in record['snapshots']:
        net = memdiff.load_network(folder / row['snapshot'])
        x, _ = memdiff.generate(net, 12, (1, 8, 8), 0, torch.device('cpu'), 3)
        assert row['ratio'] == memdiff.score(x, y)[0]['ratio']
    assert record['best']['ratio'] == max(r['ratio'] for r in record['snapshots'])
    assert not marker.exists()
