"""Sixteen fixed English prompts, about 20 to 120 tokens each, for completion benchmarks.

Each one stops mid-thought (an unfinished sentence or list) so a model keeps writing rather than
emitting end-of-text early: the benchmark cannot rely on `ignore_eos`, which not every server
accepts, so it counts the tokens actually produced instead.
"""

from __future__ import annotations

__all__ = ["PROMPTS"]

PROMPTS: tuple[str, ...] = (
    "The old lighthouse keeper climbed the spiral stairs for the very last time, and as he "
    "reached the top",
    "Here is a step-by-step guide to baking a loaf of sourdough bread at home. First,",
    "In the winter of 1854, the city of London was gripped by a cholera outbreak. A physician "
    "named John Snow began to map the cases street by street, and he noticed that",
    "Photosynthesis is the process by which green plants turn light into chemical energy. It "
    "takes place in the chloroplasts, where",
    "Dear neighbours, we are writing to let you know about the changes to the weekly rubbish "
    "collection that start next month. From the first Monday,",
    "In my experience as a teacher, the three most common mistakes that new programmers make "
    "when they first learn to write loops are",
    "The expedition had been walking across the glacier for six days when the radio finally "
    "went silent. Nobody spoke for a while. The wind had picked up since the morning, and the "
    "thin line of cloud that had been sitting on the horizon since breakfast was now much "
    "closer and much darker than before. The guide stopped, looked at the sky to the west, "
    "counted the remaining fuel canisters twice, and then told the others that they had two "
    "choices. The first was to turn back toward the last camp, which meant",
    "A good night's sleep matters more than most people think. Researchers who study sleep "
    "have found that adults who regularly sleep less than seven hours",
    "Once upon a time, in a village at the edge of a great forest, there lived a girl who "
    "could understand the language of birds. One morning a crow landed on her windowsill and",
    "To change a flat tyre on a bicycle, you will need a set of tyre levers, a pump and a "
    "spare inner tube. Start by",
    "The history of the printing press is often told as the story of one man, but the "
    "technology that Johannes Gutenberg brought together in Mainz around 1450 drew on "
    "centuries of earlier work. Paper had come from China by way of the Islamic world, "
    "screw presses were already used to make wine and olive oil, and metalworkers "
    "already cast small objects in moulds. What was new was the combination: a hand "
    "mould that could cast thousands of identical letters, an oil-based ink that would stick "
    "to metal, and a workshop that could print many pages a day. Within fifty years,",
    "Our quarterly report to the board shows that sales grew in every single region except "
    "the north, where",
    "When you visit Kyoto for the first time, the best way to spend your first morning is to",
    "The committee met on Thursday to discuss the proposal for a new public library. Several "
    "members argued that the old building on Market Street should be renovated rather than "
    "replaced, pointing out that it had served the town for more than a century. Others said "
    "that the cost of repairs would be higher than the cost of a new building, and that",
    "Volcanoes form where molten rock from deep inside the Earth rises to the surface. Some "
    "erupt violently, throwing ash high into the atmosphere, while others release rivers of "
    "lava that flow slowly downhill for weeks. There are several kinds of volcano, and the "
    "shape of each one depends on",
    "The recipe for a simple tomato soup calls for ripe tomatoes, an onion, two cloves of "
    "garlic, olive oil, salt, a little sugar and a handful of fresh basil. It serves four "
    "people and takes about forty minutes from start to finish, most of which is gentle "
    "simmering. Begin by chopping the onion finely, then",
)
