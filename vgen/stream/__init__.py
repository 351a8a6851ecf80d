"""``vgen stream``: a browser demo that streams a video model's frames as each block is generated.

``vgen.stream.app`` holds the FastAPI app (session manager, generation worker; needs the optional extra
``pip install 'vgen[stream]'``), ``vgen.stream.protocol`` the websocket protocol (importable without the extra), and
``static/`` the page (HTML, JS, CSS; nothing is loaded from the network).
"""
