"""The web console in a real browser: Debian's headless Chromium, driven by Selenium
through Debian's chromedriver, against sf-up with a real TCG guest.

Screenshots of each page are kept in build/test-artifacts/browser/ (SF_TEST_ARTIFACTS
names another directory)."""

import os
import pathlib
import shutil

import pytest

from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net, specs_pb2
from tests.helpers import get
# The image over HTTP and a plane of one node, as the guests' tests have them.
from tests.test_e2e_guests import BOOT, client, image_url, plane  # noqa: F401
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = pathlib.Path(os.environ.get('SF_TEST_ARTIFACTS', ROOT / 'build' / 'test-artifacts')) / 'browser'
CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')


@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    assert CHROMIUM and CHROMEDRIVER, 'make deps installs chromium and chromium-driver'
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1280,1400'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)       # this run's screenshots only
    ARTIFACTS.mkdir(parents=True)
    yield driver
    driver.quit()


class Page:
    """The browser on the web console, with waits on conditions (never sleeps)."""

    def __init__(self, driver, base):
        self.driver, self.base = driver, base

    def find(self, css):
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def until(self, condition, what, timeout=60):
        from selenium.webdriver.support.ui import WebDriverWait
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda d: condition())
        except Exception as e:
            self.shot('failed')
            raise AssertionError(f'{what} not seen within {timeout}s; the page said: '
                                 f'{self.text("#error")!r}; the terminal ends with '
                                 f'{terminal_text(self.driver).split(chr(10))[-4:]!r}; '
                                 f'browser log: {self.console_log()}') from e

    def within(self, condition, timeout) -> bool:
        """Whether condition holds within timeout."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait
        try:
            return bool(WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda d: condition()))
        except TimeoutException:
            return False

    def text(self, css):
        found = self.all(css)
        return found[0].text if found else ''

    def console_log(self):
        try:
            return [entry['message'] for entry in self.driver.get_log('browser')][-10:]
        except Exception:   # noqa: BLE001 -- only for the failure message
            return []

    def shot(self, name):
        self.driver.save_screenshot(str(ARTIFACTS / f'{name}.png'))

    def click(self, css) -> bool:
        """Click css; False if the page re-rendered it meanwhile (try again)."""
        from selenium.common.exceptions import StaleElementReferenceException
        try:
            self.find(css).click()
            return True
        except StaleElementReferenceException:
            return False

    def row(self, name):
        """The cells of the list's row of name, read at once (the list re-renders live)."""
        return self.driver.execute_script(
            'const r = document.querySelector(`#instances tbody tr[data-name="${arguments[0]}"]`);'
            'return r ? [...r.cells].map((c) => c.textContent) : null;', name)


def terminal_text(driver) -> str:
    """The terminal's lines (its scrollback too), each without trailing blanks."""
    return '\n'.join(line.rstrip() for line in _terminal_lines(driver).split('\n'))


def _terminal_lines(driver) -> str:
    return driver.execute_script(
        'const b = window.sfTerminal && window.sfTerminal.buffer.active; if (!b) return "";'
        'let out = []; for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));'
        'return out.join("\\n");')


def canvas_colours(driver) -> int:
    """How many distinct colours the VNC canvas shows (a few hundred pixels sampled)."""
    return driver.execute_script(
        'const c = document.querySelector("#vnc canvas"); if (!c || !c.width) return 0;'
        'const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data; const seen = new Set();'
        'for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);'
        'return seen.size;')


async def test_sign_in_watch_a_guest_appear_use_its_terminal_and_screen_and_power_it_off(
        plane, client, browser, image_url):  # noqa: F811
    from selenium.webdriver.common.keys import Keys
    await client.networks.CreateNetwork(net.CreateNetworkRequest(name='web', netblock='10.30.0.0/24'))
    ui = Page(browser, plane.endpoints['rest'])
    browser.get(ui.base + '/ui/')

    # A wrong key is refused on the page; the right one signs in.
    ui.until(lambda: ui.all('#sign-in'), 'the sign-in form')
    ui.find('#namespace').send_keys('system')
    ui.find('#key').send_keys('not the key')
    ui.find('#sign-in-button').click()
    ui.until(lambda: ui.find('#error').is_displayed(), 'the refusal')
    ui.find('#key').clear()
    ui.find('#key').send_keys(plane.endpoints['key'])
    ui.find('#sign-in-button').click()
    ui.until(lambda: ui.all('#instances') and ui.text('#live') == 'live', 'the live instance list')
    ui.shot('1-list-empty')

    # A guest created elsewhere (gRPC) appears in the open list, and becomes created.
    await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='webguest', cpus=1, memory=256, disk=[specs_pb2.DiskSpec(size=1, base=image_url)],
        network=[specs_pb2.NetworkSpec(network_uuid='web')],
        video=specs_pb2.VideoSpec(model=specs_pb2.VIDEO_MODEL_VGA, memory=16384, vdi=specs_pb2.VDI_TYPE_VNC)))
    ui.until(lambda: ui.row('webguest'), 'the new guest in the list', timeout=30)
    ui.until(lambda: (ui.row('webguest') or [''] * 3)[1:3] == ['created', 'on'], 'the guest created and on',
             timeout=BOOT)
    ui.shot('2-list-with-guest')
    guest = await get(client, 'webguest')

    # Its page: details, the serial terminal (what is typed runs in the guest), the screen.
    ui.until(lambda: ui.click('#instances tbody tr[data-name="webguest"]'), 'a click on the row')
    ui.until(lambda: ui.text('#detail-uuid') == guest.uuid, 'the instance page')
    ui.until(lambda: ui.all('#terminal .xterm-helper-textarea'), 'the terminal')
    # Enter gives a line of its own with the shell's prompt ("/ #") once the shell is up.
    def prompted():
        prompts = terminal_text(browser).split('\n').count('/ #')
        ui.find('#terminal .xterm-helper-textarea').send_keys(Keys.ENTER)
        return ui.within(lambda: terminal_text(browser).split('\n').count('/ #') > prompts, 5)
    ui.until(prompted, 'a shell prompt after Enter', timeout=BOOT)
    ui.find('#terminal .xterm-helper-textarea').send_keys('echo browser-$((6 * 7))-works' + Keys.ENTER)
    ui.until(lambda: 'browser-42-works' in terminal_text(browser).split('\n'),
             "the command's output, a line of its own, in the terminal")
    ui.shot('3-terminal')
    ui.until(lambda: ui.text('#vnc-status') == '(connected)', 'the VNC console connected')
    ui.until(lambda: canvas_colours(browser) > 1, 'the VNC canvas drawn')
    ui.shot('4-vnc')
    ui.until(lambda: ui.all('#events tbody tr'), 'the instance events')

    # A screenshot through the API shows on the page.
    ui.find('#screenshot-button').click()
    ui.until(lambda: ui.find('#screenshot').is_displayed() and browser.execute_script(
        'return document.getElementById("screenshot").naturalWidth') > 0, 'the screenshot image')

    # Power off from the page: the state on the page changes (live, from the events).
    ui.find('#power-off').click()
    try:
        await eventually(lambda: _power_off(client), 120, interval=0.5, what='the guest powered off')
    except AssertionError as e:
        lines = [line for line in plane.node_log('node0').splitlines() if guest.uuid in line or 'power' in line]
        raise AssertionError(f'{e}; node0 said: {lines[-15:]}') from None
    ui.until(lambda: ui.text('#detail-power_state') == 'off', 'the power state off on the page', timeout=60)
    ui.shot('5-powered-off')

    # Back on the list, the state shows there too; the screenshots were kept.
    ui.find('#nav-instances').click()
    ui.until(lambda: (ui.row('webguest') or [''] * 3)[2] == 'off', 'power off in the list')
    for name in ('1-list-empty', '2-list-with-guest', '3-terminal', '4-vnc', '5-powered-off'):
        assert (ARTIFACTS / f'{name}.png').stat().st_size > 1000


async def test_the_create_form_makes_the_instance_it_describes(plane, client, browser, image_url):  # noqa: F811
    from selenium.webdriver.support.ui import Select
    ui = Page(browser, plane.endpoints['rest'])
    browser.get(ui.base + '/ui/#/create')
    ui.until(lambda: ui.all('#create select[name=network] option[value]') and len(
        ui.all('#create select[name=network] option')) > 1, 'the create form with its networks')
    form = ui.find('#create')
    form.find_element('name', 'name').send_keys('formguest')
    form.find_element('name', 'cpus').clear()
    form.find_element('name', 'cpus').send_keys('2')
    form.find_element('name', 'disk_base').send_keys(image_url)
    Select(form.find_element('name', 'network')).select_by_index(1)
    Select(form.find_element('name', 'video_model')).select_by_visible_text('vga')
    ui.shot('6-create-form')
    ui.find('#create-button').click()
    ui.until(lambda: ui.text('#instance-name') == 'formguest', 'the new instance page')
    made = await get(client, 'formguest')
    assert (made.cpus, made.memory, made.video.model, made.video.vdi) == (
        2, 256, specs_pb2.VIDEO_MODEL_VGA, specs_pb2.VDI_TYPE_VNC)
    assert [d.base for d in made.disk_spec] == [image_url] and len(made.interfaces) == 1
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='formguest'))
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='webguest'))
    await eventually(lambda: _gone(client), BOOT, interval=0.5, what='both instances deleted')


async def _gone(client):
    listed = await client.instances.ListInstances(api.ListInstancesRequest())
    return not [i for i in listed.instances if i.state != pb.INSTANCE_STATE_DELETED]


async def _power_off(client):
    return (await get(client, 'webguest')).power_state == pb.POWER_STATE_OFF
