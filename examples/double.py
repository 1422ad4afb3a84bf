"""The prototype's example as a module: `sless submit examples/double.py --input 21` gives 42."""


def main(input):
    return input * 2
