"""The tdb dashboard: a Streamlit + Altair app over `tdb_client` (it never imports the server).

    tdb dashboard                       # starts an embedded server on the bundled model
    tdb dashboard --server HOST:PORT    # or connects to a running one

`app.py` is the Streamlit script (a sidebar with the connection, the model and the page picker; every
view's state lives in the URL query string); `views/` holds one module per page; `charts.py` the
Altair charts; `connection.py` the cached client, per-user sessions and error display; `launch.py` the
`tdb dashboard` command.
"""
