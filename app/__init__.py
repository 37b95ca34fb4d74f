"""erf-lab's Streamlit app (``streamlit run app/main.py``): pages in ``app/views/`` over small modules, one
concern each, that call the ``erf_lab`` / ``fastconv`` library (layout: app/README.md)."""
