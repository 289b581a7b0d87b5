"""Packaging: a plain install carries the bundled digits where memdiff looks for them."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import memdiff

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_the_digits_under_share_memdiff_where_memdiff_looks(tmp_path):
    """The wheel built from pyproject.toml holds data/digits.csv.gz as <prefix>/share/memdiff, the
    folder memdiff.DATA_DIRS names after the one beside memdiff.py (a checkout)."""
    src = tmp_path / 'src'                                  # a copy: the build writes build/ there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', 'runs', 'build', '*.egg-info',
                                                             '.hypothesis', '__pycache__'))
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                        '-q', '-w', str(tmp_path / 'dist'), str(src)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = (tmp_path / 'dist').glob('memdiff-*.whl')
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        data = [n for n in names if n.endswith('.data/data/share/memdiff/digits.csv.gz')]
        assert data and z.read(data[0]) == (ROOT / 'data' / 'digits.csv.gz').read_bytes()
    assert {'memdiff.py', 'run_emm.py'} <= set(names)
    assert memdiff.DATA_DIRS == (ROOT / 'data', Path(sysconfig.get_path('data')) / 'share' / 'memdiff')


def test_without_the_data_beside_the_module_the_installed_folder_is_read(tmp_path, monkeypatch):
    """When data/ is not beside memdiff.py (an installed module), the digits are read from the
    second folder; when neither holds them, one ValueError says they are missing."""
    installed = tmp_path / 'share' / 'memdiff'
    installed.mkdir(parents=True)
    shutil.copy(ROOT / 'data' / 'digits.csv.gz', installed)
    monkeypatch.setattr(memdiff, 'DATA_DIRS', (tmp_path / 'nowhere', installed))
    images, labels = memdiff.load_dataset('digits')
    assert images.shape == (1797, 1, 8, 8)
    monkeypatch.setattr(memdiff, 'DATA_DIRS', (tmp_path / 'nowhere',))
    with pytest.raises(ValueError, match='missing from the installation'):
        memdiff.load_dataset('digits')


@pytest.mark.slow
def test_pip_install_then_run_emm_measures_a_size_from_the_installed_digits(tmp_path):
    """`pip install .` into a fresh environment, then `run-emm --sizes 16 --steps 50 --samples 50`
    run away from the checkout: the installed command finds the installed digits and exits 0."""
    src = tmp_path / 'src'                                  # a copy: the build writes build/ there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', 'runs', 'build', '*.egg-info',
                                                             '.hypothesis', '__pycache__'))
    env = tmp_path / 'venv'                                 # torch, pip and setuptools from here
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip',
                    str(env)], check=True)
    bin = env / ('Scripts' if sys.platform == 'win32' else 'bin')
    r = subprocess.run([str(bin / 'python'), '-m', 'pip', 'install', '--no-deps',
                        '--no-build-isolation', '-q', str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(bin / 'run-emm'), '--sizes', '16', '--steps', '50', '--samples', '50',
                        '--outdir', str(tmp_path / 'x')], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / 'x' / 'n16.json').is_file() and 'EMM at 90%' in r.stdout
    where = subprocess.run([str(bin / 'python'), '-c', 'import memdiff; print(memdiff.__file__)'],
                           capture_output=True, text=True, cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(env)          # the installed copy, not the checkout
