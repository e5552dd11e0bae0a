"""Drives a headless Chromium over the DevTools protocol, inside whatever network namespace it runs in.

argv: URL PROFILE_DIR. Reads JSON commands on stdin, one a line, answers each with one JSON line:
  {"until": JS, "timeout": S}  evaluate JS until it is truthy -> {"value": ...} or {"error": "timeout", "last": ...}
  {"eval": JS}                 -> {"value": ...}
  {"shot": PATH}               a PNG screenshot of the page -> {"bytes": N}
The first line it prints is {"ready": true} once the page is navigated to URL. Chromium goes when stdin ends.
"""
import asyncio
import base64
import json
import re
import subprocess
import sys

import aiohttp


async def main(url: str, profile: str) -> None:
    proc = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1440,1000",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ws_url = None
        while ws_url is None:
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stderr.readline)
            if not line:
                raise RuntimeError("chromium exited before its DevTools endpoint was up")
            m = re.search(rb"DevTools listening on (ws://\S+)", line)
            ws_url = m and m.group(1).decode()
        port = int(re.search(r":(\d+)/", ws_url).group(1))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method, **params):
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == i:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg["result"]

                async def evaluate(js):
                    r = await call("Runtime.evaluate", expression=js, returnByValue=True)
                    return r["result"].get("value")

                await call("Page.enable")
                await call("Page.navigate", url=url)
                print(json.dumps({"ready": True}), flush=True)
                loop = asyncio.get_running_loop()
                while True:
                    line = await loop.run_in_executor(None, sys.stdin.readline)
                    if not line:
                        return
                    cmd = json.loads(line)
                    if "until" in cmd:
                        deadline = loop.time() + cmd.get("timeout", 20)
                        last = None
                        while True:
                            try:
                                last = await evaluate(cmd["until"])
                            except RuntimeError as e:
                                last = str(e)
                            if last:
                                out = {"value": last}
                                break
                            if loop.time() > deadline:
                                out = {"error": "timeout", "last": last}
                                break
                            await asyncio.sleep(0.1)
                    elif "eval" in cmd:
                        out = {"value": await evaluate(cmd["eval"])}
                    elif "shot" in cmd:
                        png = base64.b64decode((await call("Page.captureScreenshot", format="png",
                                                           captureBeyondViewport=True))["data"])
                        with open(cmd["shot"], "wb") as f:
                            f.write(png)
                        out = {"bytes": len(png)}
                    else:
                        out = {"error": f"unknown command {cmd}"}
                    print(json.dumps(out), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
