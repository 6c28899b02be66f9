"""Every kind of function, each handing back what it was given: for the
frame fuzz test (tests/test_frames.py), where nothing a payload says may
make a function run long or start anything."""

from pyfleet import App

app = App()


@app.function
def echo(payload):
    return payload


@app.function
async def aecho(payload):
    return payload


@app.function
def gecho(payload):
    yield payload


@app.function
async def agecho(payload):
    yield payload


@app.function(raw=True)
def recho(data):
    return data
