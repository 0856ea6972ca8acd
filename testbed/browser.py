"""A browser session on the real webui's chat page, driven by selenium in headless Chromium (the hosts'
``prepare.sh DIR --browser`` installs Chromium, chromedriver and selenium)."""

import os
import shutil
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

CHROMEDRIVER = "/usr/bin/chromedriver"


class Page:
    """One browser session on the webui's chat page."""

    def __init__(self, server):
        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--window-size=1400,1000", "--disable-gpu",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", "--disable-dev-shm-usage"):
            options.add_argument(argument)
        if os.path.exists("/usr/bin/chromium"):
            options.binary_location = "/usr/bin/chromium"
        self.server = server
        # Chromium's profile and its own temporary folders go in a folder of this page, removed on close
        self.scratch = tempfile.mkdtemp(prefix="llava-browser-")
        options.add_argument(f"--user-data-dir={os.path.join(self.scratch, 'profile')}")
        service = webdriver.ChromeService(CHROMEDRIVER, env={**os.environ, "TMPDIR": self.scratch})
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.get(server.base)
        self.wait_for(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#llava-picture input[type=file]"),
                      "the LLaVA field")
        assert self.styled_rules("#chat-input") > 0, "the page is not styled: the webui's css/main.css is missing"

    def styled_rules(self, selector: str) -> int:
        """How many style rules of the page name ``selector`` (the webui's own css/main.css has many)."""
        return self.driver.execute_script(
            "let n = 0; for (const sheet of document.styleSheets) { let rules; try { rules = sheet.cssRules; } "
            "catch (e) { continue; } for (const rule of rules) { if ((rule.selectorText || '').includes(arguments[0])) "
            "n++; } } return n;", selector)

    def wait_for(self, condition, what: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = condition()
            except StaleElementReferenceException:  # the page re-rendered under our feet
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"waited {timeout} s for {what}")

    def in_new_chat(self) -> "Page":
        self.new_chat()
        return self

    def new_chat(self) -> None:
        self.driver.find_element(By.ID, "new-chat-btn").click()
        self.wait_for(lambda: not self.messages(), "an empty chat")

    def pick(self, path: str) -> None:
        """Choose a picture in the extension's field, and wait until the field shows it."""
        self.driver.find_element(By.CSS_SELECTOR, "#llava-picture input[type=file]").send_keys(path)
        name = os.path.basename(path)
        self.wait_for(lambda: name in self.field_files(), f"{name} in the LLaVA field")
        time.sleep(0.5)  # the upload event reaches the server after the field shows the file

    def field_files(self) -> list[str]:
        return [cell.get_attribute("aria-label")
                for cell in self.driver.find_elements(By.CSS_SELECTOR, "#llava-picture td.filename")]

    def preview(self) -> str | None:
        """Where the picture shown under the LLaVA field comes from; None when none is shown."""
        shown = [image.get_attribute("src") for image in self.driver.find_elements(By.CSS_SELECTOR, "#llava-preview img")]
        return shown[0] if shown else None

    def preview_screenshot(self):
        """The preview box as the window shows it once scrolled into view (a PIL image), and whether the
        whole box then lies inside the window."""
        import io

        from PIL import Image
        box = self.driver.find_element(By.ID, "llava-preview")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        time.sleep(0.3)
        inside = self.driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return r.top >= 0 && r.left >= 0 && "
            "r.bottom <= window.innerHeight && r.right <= window.innerWidth;", box)
        return Image.open(io.BytesIO(box.screenshot_as_png)), inside

    def clear_field(self) -> None:
        self.driver.find_element(By.CSS_SELECTOR, "#llava-picture button[aria-label='Clear']").click()
        self.wait_for(lambda: not self.field_files(), "an empty LLaVA field")
        time.sleep(0.5)

    def attach(self, path: str) -> None:
        """The webui's own attach button (the chat box's file input)."""
        field = self.driver.find_element(By.CSS_SELECTOR, "#chat-input input[type=file]")
        # chromedriver adds to what a multiple-file input held before; a person's pick replaces it
        self.driver.execute_script("arguments[0].value = '';", field)
        field.send_keys(path)
        name = os.path.basename(path)
        self.wait_for(lambda: name in self.driver.find_element(By.ID, "chat-input").text or
                      self.driver.find_elements(By.CSS_SELECTOR, "#chat-input .thumbnail-item, #chat-input img"),
                      f"{name} attached")

    def set_embed_all(self, on: bool) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, "#llava-embed-all input[type=checkbox]")
        if box.is_selected() != on:
            box.click()
        time.sleep(0.5)

    def messages(self):
        return self.driver.find_elements(By.CSS_SELECTOR, "#chat .user-message, #chat .assistant-message")

    def send(self, text: str, wait_for_reply: bool = True) -> str | None:
        """Type ``text``, press Send, and return the reply once generation has ended (a random model's
        reply may show nothing: then only the end of generation is waited for)."""
        replies = len(self.driver.find_elements(By.CSS_SELECTOR, "#chat .assistant-message"))
        done = self.server.count("Output generated in")
        self.driver.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys(text)
        self.driver.find_element(By.ID, "Generate").click()
        self.server.wait_for_count("Output generated in", done + 1)
        if not wait_for_reply:
            return None

        def reply():
            found = self.driver.find_elements(By.CSS_SELECTOR, "#chat .assistant-message")
            text = found[-1].find_element(By.CSS_SELECTOR, ".message-body").text.strip() if len(found) > replies else ""
            return text if text and "typing" not in text.lower() else None
        first = self.wait_for(reply, "the reply on the page")
        time.sleep(0.5)
        return self.wait_for(reply, "the reply on the page") or first

    def press(self, button: str) -> None:
        """One of the chat's buttons by its element id (``Regenerate``, ``Continue``; the webui keeps them in a
        menu), and wait for the generation it starts to end."""
        done = self.server.count("Output generated in")
        self.driver.execute_script("document.getElementById(arguments[0]).click();", button)
        self.server.wait_for_count("Output generated in", done + 1)
        time.sleep(0.5)

    def last_user_message(self):
        return self.driver.find_elements(By.CSS_SELECTOR, "#chat .user-message")[-1]

    def screenshot(self, path: str) -> None:
        self.driver.save_screenshot(path)

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.scratch, ignore_errors=True)
