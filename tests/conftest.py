import os
import shutil
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")

from testbed import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: demo evaluations, the CLI as a subprocess and the real-webui tests; "
                                       "CI runs them, `-m \"not slow\"` leaves them out")


@pytest.fixture(scope="session")
def v0(tmp_path_factory):
    return tiny.build_v0(str(tmp_path_factory.mktemp("v0")))


@pytest.fixture(scope="session")
def v0_reference(v0):
    return tiny.reference_llava(v0.clip_dir, v0.llm, v0.projector_state, image_token_id=32000)


@pytest.fixture(scope="session")
def v15(tmp_path_factory):
    from testbed.tiny_family import build_v15
    return build_v15(str(tmp_path_factory.mktemp("v15")))


@pytest.fixture(scope="session")
def v15_reference(v15):
    from testbed.tiny_family import reference_v15
    return reference_v15(v15)


@pytest.fixture(scope="session")
def next_reference():
    """transformers' LlavaNextForConditionalGeneration at LLaVA-1.6's geometry, and its tokenizer."""
    from testbed.tiny_next import build_next
    return build_next()


def converted(tmp_path_factory, name: str, save) -> "tiny.Loaded":
    """A checkpoint ``save(folder)`` writes under ``name``, converted and loaded."""
    folder = tmp_path_factory.mktemp(name)
    return tiny.convert_and_load(save(str(folder / name)), str(folder / "converted"))[1]


@pytest.fixture(scope="session")
def next_converted(next_reference, tmp_path_factory):
    """``next_reference`` saved as a llava-hf llava-v1.6-vicuna-7b-hf checkpoint, converted and loaded
    (a ``testbed.tiny.Loaded``)."""
    from testbed.tiny_next import save_next_hf
    return converted(tmp_path_factory, "llava-v1.6-vicuna-7b-hf", lambda folder: save_next_hf(folder, *next_reference))


@pytest.fixture
def host_factory():
    from testbed.fake_webui import Host
    hosts = []

    def make(**kwargs):
        host = Host(**kwargs)
        hosts.append(host)
        return host

    yield make
    for host in reversed(hosts):  # each host restores the modules it found, so the last one goes first
        host.close()


@pytest.fixture
def host(v0, host_factory):
    """The fake webui with the tiny v0 model loaded and its LLaVA settings."""
    return host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Let fixtures know whether the test itself failed (the browser tests keep a screenshot then)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed_call = True


@pytest.fixture
def open_page(request):
    """Browser sessions on a real webui (testbed.browser.Page); a failing test leaves each page's screenshot
    and the server log in test-artifacts/."""
    from testbed.browser import Page
    pages = []

    def make(server):
        page = Page(server)
        pages.append(page)
        return page

    yield make
    failed = getattr(request.node, "failed_call", False)
    for i, page in enumerate(pages):
        if failed:
            folder = os.path.join(ROOT, "test-artifacts")
            os.makedirs(folder, exist_ok=True)
            page.screenshot(os.path.join(folder, f"{request.node.name}-{i}.png"))
            shutil.copy(page.server.log, os.path.join(folder, f"{request.node.name}-server.log"))
        page.close()


@pytest.fixture(scope="session")
def onevision_reference():
    """transformers' LlavaOnevisionForConditionalGeneration at OneVision's geometry, and its Qwen2 tokenizer."""
    from testbed.tiny_onevision import build_onevision
    return build_onevision()


@pytest.fixture(scope="session")
def onevision_converted(onevision_reference, tmp_path_factory):
    """``onevision_reference`` saved as a llava-hf llava-onevision-qwen2-*-ov-hf checkpoint, converted and
    loaded (a ``testbed.tiny.Loaded``)."""
    from testbed.tiny_onevision import onevision_image_processor, save_hf
    return converted(tmp_path_factory, "llava-onevision-qwen2-tiny-ov-hf",
                     lambda folder: save_hf(folder, *onevision_reference, onevision_image_processor()))
