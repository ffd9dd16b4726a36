"""Good Cosmos-style paragraphs the quality gate must pass (tests/unit/test_quality.py) and judges in the benchmark
(bench/vllm_cpu.py). Plain data: importable without pytest, from the vLLM environment too."""

# Written for these tests in the style of the Cosmos Transfer upsampler's answers: one paragraph, the scene, the
# objects, their motion, the light; most begin "The video shows/captures/opens ...", as NVIDIA's examples do.
from __future__ import annotations

GOOD_PARAGRAPHS = {
    "video_shows": (
        "The video shows a white industrial robot arm mounted on a steel workbench in a brightly lit laboratory. "
        "In front of it, a cluttered wooden table holds screwdrivers, a roll of tape, a notebook and a glossy red "
        "ceramic cup. The arm lowers its two-finger gripper, closes it around the handle of the cup and lifts it "
        "slowly, keeping it level. It then rotates to the left and places the cup on a grey metal shelf at chest "
        "height, releasing it gently before returning to its resting pose. Soft overhead light casts short shadows."),
    "video_captures": (
        "The video captures a busy city intersection on a rainy evening. Pedestrians in dark coats and bright "
        "umbrellas cross the wet asphalt on a wide zebra crossing, while a row of cars waits at a red traffic light, "
        "their headlights reflecting in the puddles. Neon signs from the shops along the street glow in pink and "
        "blue, and light rain streaks through the beams of the street lamps. The camera stays still at eye level "
        "on the corner as the crowd moves from left to right and the first cars begin to roll when the light turns "
        "green."),
    "frame_in_the_scene": (
        "The video opens on a narrow warehouse aisle lined with tall blue pallet racks stacked with cardboard boxes. "
        "A yellow forklift enters the frame from the right, its forks raised to the height of the second shelf. The "
        "driver, wearing an orange safety vest and a white helmet, slows down, aligns the forks with a wooden "
        "pallet and slides them under it. The pallet is lifted a few centimetres, pulled out of the rack and carried "
        "towards the loading dock as the forklift leaves the frame on the left. Cool fluorescent light fills the "
        "aisle."),
    "no_video_words": (
        "A small quadcopter drone glides low over a rocky coastline at sunrise, following the edge of the cliffs. "
        "Waves roll in from the open sea and break against dark boulders, throwing white spray into the warm "
        "orange light. The drone holds a steady altitude of a few metres while it moves forward, revealing a "
        "sandy cove with scattered driftwood and a narrow footpath climbing up the slope. Long shadows stretch "
        "across the rocks, and the sky shifts from deep pink near the horizon to pale blue above."),
    "kitchen": (
        "The video takes place in a modern kitchen with white cabinets, a stainless steel sink and a marble "
        "countertop. A humanoid robot with a matte grey body stands at the counter holding a folded blue cloth in "
        "its right hand. It wipes the counter in slow, overlapping strokes from the back wall towards the edge, "
        "pushing a few crumbs into its open left hand. Sunlight enters through a window above the sink and "
        "reflects off the polished surface, while a kettle and a bowl of lemons stay untouched at the far end."),
    "sequence_of_images": (
        "The video shows a sequence of quick cuts in a bicycle workshop, where a mechanic in a green apron adjusts "
        "the brakes of a road bike clamped in a repair stand. The frame of the bike is matte black with orange "
        "lettering. He turns a small hex key, squeezes the brake lever twice and spins the front wheel to check "
        "that it runs freely. Tools hang on a pegboard behind him, and warm light from a desk lamp falls across the "
        "workbench."),
}

# NVIDIA's own upsampled prompts (cosmos-transfer1): the upsampler's answer in examples/inference_cosmos_transfer1_7b.md
# and the long prompts of assets/inference_cosmos_transfer1_single_control_*.json and robot_sample_spec.json.
UPSTREAM_PARAGRAPHS = {
    "transfer1_example_answer": (
        "The video opens with a close-up of a robotic arm holding a coffee cup with a lid, positioned next to a "
        "coffee machine. The arm is metallic with a black wrist, and the coffee cup is white with a brown lid. The "
        "background shows a modern office environment with a woman in a blue top and black pants standing in the "
        "distance. As the video progresses, the robotic arm moves the coffee cup towards the woman, who approaches "
        "to receive it. The woman has long hair and is wearing a blue top and black pants. The office has a "
        "contemporary design with glass partitions, potted plants, and other office furniture."),
    "robot_sample_spec": (
        "Inside a warm, rustic farmhouse kitchen, a bi-manual robot gently closes the door of a vintage-style "
        "refrigerator with a curved handle. The kitchen exudes charm with wooden cabinets, open shelves lined with "
        "ceramic dishware, and a cast-iron stove nearby. Sunlight streams in through a window adorned with lace "
        "curtains, illuminating the tiled floor. The fridge door latches with a soft click as the robot completes "
        "its task."),
}
