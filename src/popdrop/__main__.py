from popdrop.cli import app

app(prog_name="popdrop")
