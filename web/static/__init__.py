"""The web page's files, installed with tilechain as package data and served by tilechain.web
(`tilechain web`). app.js is built by `make web` from web/src; do not edit it by hand."""
