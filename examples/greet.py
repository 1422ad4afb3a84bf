"""Takes a JSON object: `sless submit examples/greet.py --input '{"name": "Ada", "times": 2}'`."""


def main(input):
    name = input.get("name", "world")
    times = int(input.get("times", 1))
    return {"greeting": " ".join([f"Hello, {name}!"] * times), "length": len(name)}
